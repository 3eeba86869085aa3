//! The VXLAN header (RFC 7348 §5), as Linux's vxlan driver reads and writes it.
//!
//! ```text
//!  0                   1                   2                   3
//! |R|R|R|R|I|R|R|R|            Reserved                           |
//! |                VXLAN Network Identifier (VNI) |   Reserved    |
//! ```
//!
//! RFC 7348 says reserved bits are "ignored on receipt"; Linux (`vxlan_rcv`) drops a packet
//! with any unprocessed reserved bit set, as "more robust and … a little more security".
//! weft follows Linux.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fmt;

mod field {
    pub const FLAGS: usize = 0;
    pub const VNI: core::ops::Range<usize> = 4..7;
}

/// Length of the VXLAN header.
pub const HEADER_LEN: usize = 8;

/// The I flag: the VNI is valid.
const FLAG_I: u8 = 0x08;

/// A 24-bit VXLAN Network Identifier.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct Vni(u32);

impl Vni {
    /// The VNI, if it fits 24 bits.
    pub const fn new(v: u32) -> Option<Self> {
        if v < 1 << 24 { Some(Self(v)) } else { None }
    }

    /// The numeric value.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a VXLAN header was refused; each is its own drop reason.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum VxlanError {
    /// Shorter than 8 bytes.
    Truncated,
    /// The I flag is clear.
    BadFlags,
    /// A reserved bit is set.
    ReservedBits,
}

/// A view of a checked VXLAN header and what follows it.
#[derive(Debug)]
pub struct VxlanHeader<T: AsRef<[u8]>> {
    buffer: T,
}

#[allow(clippy::indexing_slicing)] // in bounds: the 8 bytes `new_checked` verified (mod.rs contract).
impl<T: AsRef<[u8]>> VxlanHeader<T> {
    /// Wraps a buffer the caller has already sized (at least [`HEADER_LEN`] bytes).
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Checks the length, the I flag and that every reserved bit is zero.
    ///
    /// # Errors
    /// The [`VxlanError`] naming the first problem.
    pub fn new_checked(buffer: T) -> Result<Self, VxlanError> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN {
            return Err(VxlanError::Truncated);
        }
        if b[field::FLAGS] & FLAG_I == 0 {
            return Err(VxlanError::BadFlags);
        }
        if b[field::FLAGS] & !FLAG_I != 0 || b[1] | b[2] | b[3] | b[7] != 0 {
            return Err(VxlanError::ReservedBits);
        }
        Ok(Self { buffer })
    }

    /// The VNI.
    pub fn vni(&self) -> Vni {
        let b = self.buffer.as_ref();
        Vni(u32::from_be_bytes([0, b[4], b[5], b[6]]))
    }

    /// The inner Ethernet frame.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

#[allow(clippy::indexing_slicing)] // emission into a buffer the caller sized to `HEADER_LEN`.
impl<T: AsRef<[u8]> + AsMut<[u8]>> VxlanHeader<T> {
    /// Writes a header with only the I flag set and `vni`.
    pub fn emit(&mut self, vni: Vni) {
        let b = self.buffer.as_mut();
        b[..HEADER_LEN].copy_from_slice(&[FLAG_I, 0, 0, 0, 0, 0, 0, 0]);
        b[field::VNI].copy_from_slice(&vni.0.to_be_bytes()[1..]);
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_vni_bounds() {
        let mut b = [0xffu8; 8];
        VxlanHeader::new_unchecked(&mut b[..]).emit(Vni::new(0xabcdef).unwrap());
        assert_eq!(b, [0x08, 0, 0, 0, 0xab, 0xcd, 0xef, 0]);
        assert_eq!(VxlanHeader::new_checked(&b[..]).unwrap().vni().get(), 0xabcdef);
        assert!(Vni::new(1 << 24).is_none());
    }

    #[test]
    fn refuses_what_linux_refuses() {
        let ok = [0x08u8, 0, 0, 0, 0, 0, 1, 0];
        let cases: [(&str, usize, u8, VxlanError); 5] = [
            ("I flag clear", 0, 0x00, VxlanError::BadFlags),
            ("G bit (GBP) set", 0, 0x88, VxlanError::ReservedBits),
            ("reserved byte 1", 1, 0x01, VxlanError::ReservedBits),
            ("reserved byte 3", 3, 0x80, VxlanError::ReservedBits),
            ("reserved byte 7", 7, 0x01, VxlanError::ReservedBits),
        ];
        for (name, i, v, want) in cases {
            let mut b = ok;
            b[i] = v;
            assert_eq!(VxlanHeader::new_checked(&b[..]).err(), Some(want), "{name}");
        }
        assert_eq!(VxlanHeader::new_checked(&ok[..7]).err(), Some(VxlanError::Truncated));
    }
}
