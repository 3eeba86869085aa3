//! The two control messages of UDP segmentation offload, read and written as bytes: the
//! `UDP_SEGMENT` cmsg that makes one send a GSO train, and the `UDP_GRO` cmsg that gives a
//! received train's segment size. Shared by both I/O backends.

/// Control-message space per message: one `UDP_SEGMENT` (u16) or `UDP_GRO` (int) cmsg.
pub(super) const CTRL_LEN: usize = 64;
/// `struct cmsghdr`: `cmsg_len` (size_t), `cmsg_level`, `cmsg_type` (int).
pub(super) const CMSG_HDR_LEN: usize = std::mem::size_of::<libc::cmsghdr>();

/// Control-message buffer, aligned for `struct cmsghdr`.
#[repr(C, align(8))]
pub(super) struct Ctrl(pub(super) [u8; CTRL_LEN]);

impl Ctrl {
    /// An empty buffer.
    pub(super) const fn new() -> Self {
        Self([0; CTRL_LEN])
    }

    /// Writes a `UDP_SEGMENT` cmsg of `size`; returns the `msg_controllen` to send with.
    pub(super) fn set_segment_size(&mut self, size: u16) -> usize {
        let c = &mut self.0;
        c[..8].copy_from_slice(&(CMSG_HDR_LEN + 2).to_ne_bytes());
        c[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
        c[12..16].copy_from_slice(&libc::UDP_SEGMENT.to_ne_bytes());
        c[16..18].copy_from_slice(&size.to_ne_bytes());
        (CMSG_HDR_LEN + 2).next_multiple_of(8)
    }

    /// Zeroes the buffer before a receive, so a kernel that writes nothing leaves nothing
    /// to find.
    pub(super) fn clear(&mut self) {
        self.0 = [0; CTRL_LEN];
    }

    /// The segment size of a received GRO train, from the first `len` bytes the kernel
    /// wrote.
    pub(super) fn gro_size(&self, len: usize) -> Option<usize> {
        gro_size(self.0.get(..len.min(CTRL_LEN))?)
    }
}

/// The segment size in a `UDP_GRO` cmsg among the control messages `buf`.
pub(super) fn gro_size(buf: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Some(h) = buf.get(at..at + CMSG_HDR_LEN) {
        let cmsg_len = usize::from_ne_bytes(h.get(..8)?.try_into().ok()?);
        let level = i32::from_ne_bytes(h.get(8..12)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(h.get(12..16)?.try_into().ok()?);
        if cmsg_len < CMSG_HDR_LEN {
            return None;
        }
        if level == libc::SOL_UDP && kind == libc::UDP_GRO {
            let v = i32::from_ne_bytes(buf.get(at + CMSG_HDR_LEN..at + CMSG_HDR_LEN + 4)?.try_into().ok()?);
            return usize::try_from(v).ok().filter(|v| *v > 0);
        }
        at += cmsg_len.next_multiple_of(8);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip() {
        let mut c = Ctrl::new();
        assert_eq!(c.gro_size(CTRL_LEN), None, "nothing written, nothing found");
        // What the kernel writes for a GRO train of 1472-byte segments.
        c.0[..8].copy_from_slice(&(CMSG_HDR_LEN + 4).to_ne_bytes());
        c.0[8..12].copy_from_slice(&libc::SOL_UDP.to_ne_bytes());
        c.0[12..16].copy_from_slice(&libc::UDP_GRO.to_ne_bytes());
        c.0[16..20].copy_from_slice(&1472i32.to_ne_bytes());
        assert_eq!(c.gro_size(24), Some(1472));
        assert_eq!(c.gro_size(8), None, "truncated control data");
        assert_eq!(c.set_segment_size(1400), 24);
        assert_eq!(u16::from_ne_bytes([c.0[16], c.0[17]]), 1400);
        c.clear();
        assert_eq!(c.gro_size(CTRL_LEN), None);
    }
}
