//! `PacketBuf`: one packet inside a fixed-size slot of the buffer pool.
//!
//! A slot is [`SLOT_LEN`] bytes. The packet starts [`HEADROOM`] bytes in, so encapsulation
//! can prepend its header and an ICMP error can prepend its IP and ICMP headers without
//! moving the payload (wireguard-go's `offset`). The slot holds a 64 KiB super-packet plus a
//! virtio-net header, so TUN offloads fit without new buffer types.

#![deny(unsafe_code)]
// Untrusted bytes: every index and every length computation is checked.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

/// Bytes kept free in front of every packet: enough for a 10-byte virtio-net header plus
/// the largest prefix weft writes (an IPv6 header and an ICMPv6 header, 48 bytes; VXLAN
/// writes 8 + 14).
pub const HEADROOM: usize = 128;

/// The largest packet a slot holds: an IP packet of 64 KiB, the ceiling of a TUN
/// super-packet or a UDP GRO train.
pub const MAX_PACKET: usize = 65_536;

/// Bytes per pool slot, rounded up to whole 4 KiB pages.
pub const SLOT_LEN: usize = (HEADROOM + MAX_PACKET).div_ceil(4096) * 4096;

/// A packet occupying `buf[head..end]` of a pool slot.
///
/// Invariant: `head <= end <= buf.len()`, kept by every method, so the accessors never panic.
#[derive(Debug)]
pub struct PacketBuf<'a> {
    buf: &'a mut [u8],
    head: usize,
    end: usize,
}

impl<'a> PacketBuf<'a> {
    /// A packet of `len` bytes starting at `head` in `buf`; `None` if that does not fit.
    pub fn new(buf: &'a mut [u8], head: usize, len: usize) -> Option<Self> {
        let end = head.checked_add(len)?;
        (end <= buf.len()).then_some(Self { buf, head, end })
    }

    /// The packet's bytes.
    pub fn as_slice(&self) -> &[u8] {
        self.buf.get(self.head..self.end).unwrap_or_default()
    }

    /// The packet's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.buf.get_mut(self.head..self.end).unwrap_or_default()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        // `head <= end` always; saturating, a broken invariant reads as empty, not as 2^64.
        self.end.saturating_sub(self.head)
    }

    /// Whether the packet is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.head
    }

    /// Offset of the first byte within the slot (the I/O driver submits from here).
    pub fn head(&self) -> usize {
        self.head
    }

    /// Grows the packet by `n` bytes at the front and returns them; `None` (packet
    /// unchanged) when the headroom is too small.
    pub fn prepend(&mut self, n: usize) -> Option<&mut [u8]> {
        let old = self.head;
        let head = old.checked_sub(n)?;
        self.head = head;
        self.buf.get_mut(head..old)
    }

    /// Removes `n` bytes from the front; `false` (packet unchanged) if it is shorter.
    pub fn strip(&mut self, n: usize) -> bool {
        match self.head.checked_add(n) {
            Some(head) if head <= self.end => {
                self.head = head;
                true
            }
            _ => false,
        }
    }

    /// Sets the length to `len` bytes from the head, growing into the slot's tail if needed
    /// (for replies longer than the request); `false` (unchanged) if the slot is too small.
    pub fn set_len(&mut self, len: usize) -> bool {
        match self.head.checked_add(len) {
            Some(end) if end <= self.buf.len() => {
                self.end = end;
                true
            }
            _ => false,
        }
    }

    /// Shortens the packet to `len` bytes; a longer `len` changes nothing.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.head.saturating_add(len);
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    const _: () = assert!(SLOT_LEN >= HEADROOM + MAX_PACKET && SLOT_LEN % 4096 == 0);

    #[test]
    fn prepend_strip_truncate_keep_the_invariant() {
        let mut slot = vec![0u8; 256];
        assert!(PacketBuf::new(&mut slot, 200, 57).is_none());
        let mut p = PacketBuf::new(&mut slot, HEADROOM, 100).unwrap();
        p.as_mut_slice()[0] = 0x45;
        assert_eq!(p.prepend(28).map(|b| b.len()), Some(28));
        assert_eq!(p.len(), 128);
        assert_eq!(p.as_slice()[28], 0x45);
        assert!(p.prepend(HEADROOM).is_none());
        assert!(p.strip(28));
        assert!(!p.strip(101));
        p.truncate(10);
        assert_eq!(p.len(), 10);
        p.truncate(50);
        assert_eq!(p.len(), 10);
    }
}
