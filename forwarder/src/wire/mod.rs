//! Typed views over packet bytes, in smoltcp's style: no allocation, no I/O.
//!
//! # The no-panic contract
//!
//! Every view has a `new_checked` constructor that validates the lengths its accessors rely on.
//! After `new_checked` returns `Ok`, no accessor of that view can panic, whatever the bytes
//! are. Untrusted input (anything read from the TUN or the underlay) always enters through
//! `new_checked`; `new_unchecked` is only for buffers the caller has just sized itself.
//! Indexing is allowed inside this module, after the length check that covers it, and
//! nowhere else in the data path.
//!
//! Code outside the views reads and writes fields through [`bytes`], [`be16`], [`set_be16`]
//! and friends, which return `None` for a short buffer instead of panicking; the data-path
//! modules deny `clippy::indexing_slicing` and `clippy::arithmetic_side_effects` to keep it so.
//!
//! Each view keeps its field offsets in a private `field` module, as smoltcp does, so the
//! layout reads like the RFC's header diagram.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod ndp;
pub mod tcp;
pub mod udp;
pub mod virtio_net;
pub mod vxlan;

/// The `N` bytes at `at` of `b`, if it holds them: how code outside the views reads a field
/// of an unchecked packet without indexing, so no length can panic. A fixed-size array
/// comes back, so the caller converts it without a fallible `try_into`.
#[inline]
pub fn bytes<const N: usize>(b: &[u8], at: usize) -> Option<&[u8; N]> {
    b.get(at..)?.first_chunk()
}

/// [`bytes`], writable.
#[inline]
pub fn bytes_mut<const N: usize>(b: &mut [u8], at: usize) -> Option<&mut [u8; N]> {
    b.get_mut(at..)?.first_chunk_mut()
}

/// The big-endian `u16` at `at` of `b`, if it holds one.
#[inline]
pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    bytes(b, at).map(|a| u16::from_be_bytes(*a))
}

/// The big-endian `u32` at `at` of `b`, if it holds one.
#[inline]
pub fn be32(b: &[u8], at: usize) -> Option<u32> {
    bytes(b, at).map(|a| u32::from_be_bytes(*a))
}

/// Writes `v` big-endian at `at` of `b`; `None`, and nothing written, if `b` is too short.
#[inline]
pub fn set_be16(b: &mut [u8], at: usize, v: u16) -> Option<()> {
    *bytes_mut(b, at)? = v.to_be_bytes();
    Some(())
}

/// Writes `v` big-endian at `at` of `b`; `None`, and nothing written, if `b` is too short.
#[inline]
pub fn set_be32(b: &mut [u8], at: usize, v: u32) -> Option<()> {
    *bytes_mut(b, at)? = v.to_be_bytes();
    Some(())
}

/// Why a view refused its bytes.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum WireError {
    /// The buffer is shorter than the header (or a length field) says it must be.
    Truncated,
    /// A field holds a value the format forbids (bad version, header length too small, …).
    Malformed,
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn field_helpers_refuse_short_buffers_instead_of_panicking() {
        let mut b = [0x12u8, 0x34, 0x56, 0x78, 0x9a];
        assert_eq!(be16(&b, 3), Some(0x789a));
        assert_eq!(be16(&b, 4), None);
        assert_eq!(be16(&b, usize::MAX), None);
        assert_eq!(be32(&b, 1), Some(0x3456_789a));
        assert_eq!(be32(&b, 2), None);
        assert_eq!(set_be16(&mut b, 4, 1), None);
        assert_eq!(b, [0x12, 0x34, 0x56, 0x78, 0x9a], "a refused write writes nothing");
        assert_eq!(set_be32(&mut b, 1, 0xdead_beef), Some(()));
        assert_eq!(b, [0x12, 0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(bytes::<0>(&b, 5), Some(&[]));
        assert_eq!(bytes::<1>(&b, 5), None);
    }
}
