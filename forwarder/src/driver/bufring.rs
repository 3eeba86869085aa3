//! A provided-buffer ring (`IORING_REGISTER_PBUF_RING`, Linux ≥ 5.19): pool slots lent to
//! the kernel, which picks one per completion of a multishot read or receive. One
//! multishot request per descriptor replaces dozens of armed reads, which all woke on
//! every packet and fell back to blocking io-wq threads after a spurious wake-up
//! (measured: ping RTT through weft 290 µs with 64 armed reads per descriptor).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use super::pool::BufPool;
use crate::buf::SLOT_LEN;

/// A registered ring of `entries` buffer descriptors, all pointing into pool slots.
pub(super) struct BufRing {
    base: NonNull<BufRingEntry>,
    map_len: usize,
    mask: u16,
    /// Our tail: published to the kernel by [`publish`](Self::publish).
    tail: u16,
    /// The group id requests name.
    pub(super) bgid: u16,
    /// Slots currently lent to the kernel.
    pub(super) lent: usize,
    /// Where in a slot a lent buffer starts.
    offset: usize,
}

impl BufRing {
    /// Maps and registers a ring of `entries` (a power of two) for group `bgid`; buffers
    /// start `offset` bytes into their slots.
    ///
    /// # Errors
    /// `mmap` failure, or the kernel refusing buffer rings (older than 5.19).
    pub(super) fn new(submitter: &io_uring::Submitter<'_>, entries: u16, bgid: u16, offset: usize) -> io::Result<Self> {
        if !entries.is_power_of_two() || offset >= SLOT_LEN {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer ring entries must be a power of two"));
        }
        let map_len = (usize::from(entries) * std::mem::size_of::<BufRingEntry>()).next_multiple_of(4096);
        // SAFETY: an anonymous private mapping with no address hint; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<BufRingEntry>()).ok_or_else(io::Error::last_os_error)?;
        let ring = Self { base, map_len, mask: entries - 1, tail: 0, bgid, lent: 0, offset };
        // SAFETY: the mapping holds `entries` descriptors, is page-aligned and lives until
        // `ring` is dropped, which the worker does only after the io_uring itself (field
        // order), whose teardown unregisters the group.
        unsafe { submitter.register_buf_ring_with_flags(ptr as u64, entries, bgid, 0)? };
        Ok(ring)
    }

    /// Lends pool slot `slot` to the kernel (visible after the next [`publish`](Self::publish)).
    pub(super) fn lend(&mut self, pool: &BufPool, slot: u16) {
        let i = usize::from(self.tail & self.mask);
        // SAFETY: i ≤ mask < entries, inside the mapping; the kernel reads only entries
        // between its head and the published tail, and this one is beyond the tail.
        let e = unsafe { &mut *self.base.as_ptr().add(i) };
        // SAFETY (pointer arithmetic): offset < SLOT_LEN, inside the slot.
        e.set_addr(unsafe { pool.slot_ptr(slot).add(self.offset) } as u64);
        e.set_len((SLOT_LEN - self.offset) as u32);
        e.set_bid(slot);
        self.tail = self.tail.wrapping_add(1);
        self.lent += 1;
    }

    /// Makes every lent slot visible to the kernel.
    pub(super) fn publish(&self) {
        // SAFETY: the tail field lives in the first descriptor of the mapping; the kernel
        // reads it with acquire semantics, so a release store orders the descriptors first.
        unsafe {
            let tail = BufRingEntry::tail(self.base.as_ptr()).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Where a lent buffer starts in its slot.
    pub(super) fn offset(&self) -> usize {
        self.offset
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; the io_uring that used it is
        // gone (the worker drops it first).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}
