//! `MemIo`: an [`Io`] that records every request in memory and completes it when the test
//! says, with the result the test picks (wireguard-go's tun/bind test doubles), so the
//! dispatch, its offload decisions and every run-time fallback are tested without root.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;

use super::dispatch::{Datagram, Done, Io, Out, Sender, Span};
use super::pool::BufPool;

/// One request as the dispatch made it, with a copy of its bytes.
#[derive(Clone, Debug, Eq, PartialEq)]
pub(crate) enum Request {
    /// A datagram or, with `segment`, a GSO train.
    Send { to: SocketAddr, from: Sender, segment: Option<u16>, bytes: Vec<u8> },
    /// A TUN write (gathered or not), virtio-net header included when there is one.
    TunWrite { merged: bool, bytes: Vec<u8> },
}

/// The in-memory backend: see the module documentation.
#[derive(Debug, Default)]
pub(crate) struct MemIo {
    /// Every request, in order.
    pub requests: Vec<Request>,
    /// Flow-hashed send sockets to report.
    pub flow_sockets: u32,
    /// Complete requests at once (as the recvmmsg backend does) rather than on
    /// [`MemIo::replay`] (as io_uring's completions come later).
    pub sync: bool,
    /// The errno to fail every request of a kind with.
    pub refuse: Vec<(Out, i32)>,
    /// How often the TUN's offloads were cleared.
    pub offloads_cleared: usize,
    /// Submissions (ends of batches).
    pub submits: usize,
    /// Completions not yet handed back.
    pub pending: VecDeque<Done>,
}

impl MemIo {
    /// A backend that completes requests on [`replay`](Self::replay).
    pub fn new() -> Self {
        Self::default()
    }

    fn result(&self, out: Out, len: usize) -> i32 {
        match self.refuse.iter().find(|(o, _)| *o == out) {
            Some((_, errno)) => -errno,
            None => i32::try_from(len).unwrap_or(i32::MAX),
        }
    }

    /// Takes every completion not yet handed back, for the test to feed to the dispatch.
    pub fn replay(&mut self) -> Vec<Done> {
        self.pending.drain(..).collect()
    }

    /// The sends made so far, as (segment size, datagram count, bytes).
    pub fn sends(&self) -> Vec<(Option<u16>, &[u8])> {
        self.requests
            .iter()
            .filter_map(|r| match r {
                Request::Send { segment, bytes, .. } => Some((*segment, bytes.as_slice())),
                Request::TunWrite { .. } => None,
            })
            .collect()
    }

    /// The TUN writes made so far, as (merged, bytes).
    pub fn writes(&self) -> Vec<(bool, &[u8])> {
        self.requests
            .iter()
            .filter_map(|r| match r {
                Request::TunWrite { merged, bytes } => Some((*merged, bytes.as_slice())),
                Request::Send { .. } => None,
            })
            .collect()
    }
}

fn copy(pool: &BufPool, span: Span) -> Vec<u8> {
    // SAFETY: the dispatch hands the slot to the request; nothing else writes it meanwhile.
    let bytes = unsafe { std::slice::from_raw_parts(pool.slot_ptr(span.slot), crate::buf::SLOT_LEN) };
    bytes.get(span.range()).map(<[u8]>::to_vec).unwrap_or_default()
}

impl Io for MemIo {
    fn flow_sockets(&self) -> u32 {
        self.flow_sockets
    }

    fn send(&mut self, pool: &BufPool, span: Span, d: Datagram) -> io::Result<()> {
        let Datagram { to, from, segment } = d;
        let out = if segment.is_some() { Out::SendTrain } else { Out::Send };
        let res = self.result(out, span.len);
        self.requests.push(Request::Send { to, from, segment, bytes: copy(pool, span) });
        self.pending.push_back(Done { out, slot: span.slot, res });
        Ok(())
    }

    fn write_tun(&mut self, pool: &BufPool, span: Span) -> io::Result<()> {
        let res = self.result(Out::TunWrite, span.len);
        self.requests.push(Request::TunWrite { merged: false, bytes: copy(pool, span) });
        self.pending.push_back(Done { out: Out::TunWrite, slot: span.slot, res });
        Ok(())
    }

    fn write_tun_gather(&mut self, out: u16, iov: *mut libc::iovec, n: usize, merged: bool) -> io::Result<()> {
        // SAFETY: the list stays valid until this request's completion (the Io contract).
        let list = unsafe { std::slice::from_raw_parts(iov, n) };
        let mut bytes = Vec::new();
        for v in list {
            // SAFETY: every iovec points into a slot the merge holds.
            bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        let kind = if merged { Out::TunWriteMerged } else { Out::TunWrite };
        let res = self.result(kind, bytes.len());
        self.requests.push(Request::TunWrite { merged, bytes });
        self.pending.push_back(Done { out: kind, slot: out, res });
        Ok(())
    }

    fn clear_tun_offloads(&mut self) -> io::Result<()> {
        self.offloads_cleared += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        self.submits += 1;
        Ok(())
    }

    fn take_done(&mut self) -> Option<Done> {
        if self.sync { self.pending.pop_front() } else { None }
    }
}
