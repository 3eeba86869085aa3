//! `BufPool`: one worker's packet buffers, a single anonymous mapping cut into
//! [`SLOT_LEN`] slots and registered with io_uring once.
//!
//! Ownership rule: a slot index is either on the free list, held by the worker while it
//! processes a packet, or owned by the kernel between the SQE that names it and that SQE's
//! CQE. Only the worker thread touches the pool, so the free list needs no lock.
//!
//! A slot can have several holders: a send or write that points into a slot it does not
//! own (a payload sent where it was read, a segment written where it was received) takes a
//! hold on it with [`BufPool::hold`], and the slot returns to the free list when the last
//! holder releases it.

use std::io;
use std::ops::Range;
use std::ptr::NonNull;

use crate::buf::SLOT_LEN;

/// Where a packet lies: bytes `head..head + len` of pool slot `slot`.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Span {
    /// The pool slot.
    pub slot: u16,
    /// Offset of the first byte in the slot.
    pub head: usize,
    /// Length in bytes.
    pub len: usize,
}

impl Span {
    /// `len` bytes from `head` of `slot`.
    pub const fn new(slot: u16, head: usize, len: usize) -> Self {
        Self { slot, head, len }
    }

    /// The span's bytes as a range of the slot.
    pub const fn range(self) -> Range<usize> {
        self.head..self.head + self.len
    }
}

/// Fixed-size packet buffers for one worker.
#[derive(Debug)]
pub struct BufPool {
    base: NonNull<u8>,
    slots: usize,
    free: Vec<u16>,
    /// Holders per slot: 1 when allocated, 0 when free.
    refs: Box<[u16]>,
}

// SAFETY: the mapping is owned by the pool and moves with it; nothing else aliases it.
unsafe impl Send for BufPool {}

impl BufPool {
    /// Maps `slots` slots (at most 65 536). Pages are faulted in on first touch.
    ///
    /// # Errors
    /// `mmap` failure, or a slot count of 0 or above 65 536.
    pub fn new(slots: usize) -> io::Result<Self> {
        if slots == 0 || slots > usize::from(u16::MAX) + 1 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "pool slots must be 1..=65536"));
        }
        let len = slots * SLOT_LEN;
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        let mut free = Vec::with_capacity(slots);
        // Hand out low indices first so a light load touches few pages.
        free.extend((0..slots).rev().filter_map(|i| u16::try_from(i).ok()));
        Ok(Self { base, slots, free, refs: vec![0; slots].into_boxed_slice() })
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.slots
    }

    /// Whether the pool has no slots (never true for a constructed pool).
    pub fn is_empty(&self) -> bool {
        self.slots == 0
    }

    /// Free slots right now.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Takes a free slot, with one holder: the caller.
    #[inline]
    pub fn alloc(&mut self) -> Option<u16> {
        let idx = self.free.pop()?;
        if let Some(r) = self.refs.get_mut(usize::from(idx)) {
            *r = 1;
        }
        Some(idx)
    }

    /// Adds a holder to an allocated slot: it stays off the free list until every holder
    /// has released it.
    #[inline]
    pub fn hold(&mut self, idx: u16) {
        if let Some(r) = self.refs.get_mut(usize::from(idx)) {
            debug_assert!(*r > 0, "hold on a free slot");
            *r = r.saturating_add(1);
        }
    }

    /// Drops one holder of a slot; the last one returns it to the free list. The caller
    /// must be a holder (and have nothing in flight on it).
    #[inline]
    pub fn release(&mut self, idx: u16) {
        let Some(r) = self.refs.get_mut(usize::from(idx)) else { return };
        debug_assert!(*r > 0, "release of a free slot");
        if *r == 0 {
            return;
        }
        *r -= 1;
        if *r == 0 {
            self.free.push(idx);
        }
    }

    /// Start of slot `idx`, for SQEs and iovecs.
    #[inline]
    pub fn slot_ptr(&self, idx: u16) -> *mut u8 {
        let i = usize::from(idx).min(self.slots - 1);
        // SAFETY: i < slots, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(i * SLOT_LEN) }
    }

    /// The bytes of slot `idx`.
    ///
    /// # Safety
    /// The caller must own the slot: no SQE naming it may be in flight.
    #[inline]
    pub unsafe fn slot_mut(&mut self, idx: u16) -> &mut [u8] {
        // SAFETY: the slot lies inside the mapping; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(idx), SLOT_LEN) }
    }

    /// The bytes of two distinct slots at once (read one, write the other: cutting a
    /// super-packet into a train, merging segments into a super-packet). `None` when the
    /// indices are equal or out of range.
    ///
    /// # Safety
    /// The caller must own both slots: no SQE naming either may be in flight.
    #[inline]
    pub unsafe fn pair_mut(&mut self, a: u16, b: u16) -> Option<(&mut [u8], &mut [u8])> {
        if a == b || usize::from(a) >= self.slots || usize::from(b) >= self.slots {
            return None;
        }
        // SAFETY: distinct in-range slots are disjoint ranges of the mapping; exclusivity of
        // each is the caller's promise.
        unsafe {
            Some((
                std::slice::from_raw_parts_mut(self.slot_ptr(a), SLOT_LEN),
                std::slice::from_raw_parts_mut(self.slot_ptr(b), SLOT_LEN),
            ))
        }
    }

    /// Takes a free slot and copies `len` bytes at offset `head` of slot `from` into it, at the
    /// same offset (head-end replication sends one copy per peer). `None` when the pool is
    /// empty or the range does not fit a slot.
    ///
    /// The caller must own `from` (not in flight); the new slot is the caller's.
    pub fn clone_slot(&mut self, from: u16, head: usize, len: usize) -> Option<u16> {
        if head.checked_add(len)? > SLOT_LEN {
            return None;
        }
        let copy = self.alloc()?;
        // SAFETY: `from` is owned by the caller and `copy` was just taken off the free list, so
        // neither is in flight; they are distinct slots, so the ranges do not overlap; and
        // head + len <= SLOT_LEN keeps both ranges inside their slots.
        unsafe {
            std::ptr::copy_nonoverlapping(self.slot_ptr(from).add(head), self.slot_ptr(copy).add(head), len);
        }
        Some(copy)
    }

    /// One iovec per slot, in index order, for `IORING_REGISTER_BUFFERS`.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slots)
            .filter_map(|i| u16::try_from(i).ok())
            .map(|i| libc::iovec { iov_base: self.slot_ptr(i).cast(), iov_len: SLOT_LEN })
            .collect()
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; rings using it are dropped first
        // (field order in the workers), and the kernel pins registered pages until unregistered.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.slots * SLOT_LEN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_round_trip() {
        let mut p = BufPool::new(4).unwrap();
        let a = p.alloc().unwrap();
        assert_eq!(a, 0);
        // SAFETY: slot a is ours.
        unsafe { p.slot_mut(a)[SLOT_LEN - 1] = 7 };
        let rest: Vec<_> = std::iter::from_fn(|| p.alloc()).collect();
        assert_eq!(rest.len(), 3);
        assert!(p.alloc().is_none());
        p.release(a);
        assert_eq!(p.available(), 1);
        // SAFETY: rest[0] is ours.
        unsafe { p.slot_mut(rest[0])[SLOT_LEN - 1] = 9 };
        let c = p.clone_slot(rest[0], SLOT_LEN - 1, 1).unwrap();
        assert_eq!(c, a);
        // SAFETY: both slots are ours.
        let copied = unsafe { p.slot_mut(c)[SLOT_LEN - 1] };
        assert_eq!(copied, 9, "the copy carries the source's bytes (slot {c} held 7 before)");
        assert!(p.clone_slot(rest[0], SLOT_LEN, 1).is_none());
        assert!(p.clone_slot(rest[0], 0, 1).is_none(), "pool is empty");
        assert_eq!(p.iovecs().len(), 4);
        assert!(BufPool::new(0).is_err());
    }

    #[test]
    fn a_held_slot_is_freed_by_its_last_holder() {
        let mut p = BufPool::new(2).unwrap();
        let a = p.alloc().unwrap();
        p.hold(a);
        p.hold(a);
        p.release(a);
        p.release(a);
        assert_eq!(p.available(), 1, "one holder left");
        p.release(a);
        assert_eq!(p.available(), 2);
        let again = p.alloc().unwrap();
        p.release(again);
        assert_eq!(p.available(), 2, "a reallocated slot starts with one holder");
    }
}
