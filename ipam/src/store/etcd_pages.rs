//! Reading a whole etcd prefix in pages, as one consistent snapshot (sans-IO: the caller sends
//! the requests and reports the answers).
//!
//! One Range over the subnets prefix used to return every record in one gRPC message. gRPC
//! clients refuse messages above a decode limit (tonic's default is 4 MiB), so 20 000 leases or
//! a few records near etcd's 1.5 MiB request limit made every list fail, and with it every
//! node's start and every watch resync. So:
//!
//! 1. The first page is read at the current revision; every later page is pinned to that
//!    revision (`Range.revision`), so the pages together are one snapshot, exactly what one
//!    Range would have returned, and the watch can resume right after it.
//! 2. A page is at most [`PAGE_KEYS`] keys and continues from the last key + `\0`.
//! 3. If a page is still too large for the decode limit (records near 1.5 MiB), the same page
//!    is asked again with half as many keys, down to one; the page size then grows back.
//! 4. If etcd compacted the pinned revision while we were paging (a compaction between two
//!    pages), the list restarts from the first page at the new current revision, a few times.

/// Keys per page: 1 000 flannel leases are about 150 KB, well inside any decode limit, and
/// 20 000 leases take 20 round trips.
pub(crate) const PAGE_KEYS: i64 = 1000;

/// How many times a list restarts because its revision was compacted mid-way.
pub(crate) const MAX_RESTARTS: u32 = 3;

/// The next Range to send.
#[derive(Clone, Debug, Eq, PartialEq)]
pub(crate) struct PageRequest {
    /// First key (inclusive).
    pub(crate) from: Vec<u8>,
    /// End of the prefix (exclusive).
    pub(crate) end: Vec<u8>,
    /// The snapshot's revision; 0 for the first page (current revision).
    pub(crate) revision: i64,
    /// Most keys to return.
    pub(crate) limit: i64,
}

/// How a page request failed, as far as paging cares.
#[derive(Debug, Eq, PartialEq)]
pub(crate) enum PageFailure {
    /// The answer exceeded the client's decode limit.
    TooLarge,
    /// The pinned revision was compacted.
    Compacted,
}

/// What the caller does next.
#[derive(Debug, Eq, PartialEq)]
pub(crate) enum Next {
    /// Send [`Pager::request`].
    Fetch,
    /// Throw away what was collected, then send [`Pager::request`].
    Restart,
    /// The snapshot is complete.
    Done,
}

/// Why paging gave up.
#[derive(Debug, Eq, PartialEq)]
pub(crate) enum PageGaveUp {
    /// A single record is larger than the decode limit.
    RecordTooLarge {
        /// Where the failing one-key page started: the record is the first at or after it.
        from: Vec<u8>,
    },
    /// Compacted mid-list [`MAX_RESTARTS`] times in a row.
    KeptCompacting,
}

/// The paging state machine (see the module docs).
#[derive(Debug)]
pub(crate) struct Pager {
    prefix: Vec<u8>,
    end: Vec<u8>,
    page_keys: i64,
    limit: i64,
    from: Vec<u8>,
    revision: i64,
    restarts: u32,
}

/// The end of the key range that holds exactly the keys starting with `prefix` (etcd's
/// `GetPrefixRangeEnd`): the prefix with its last byte below 0xff incremented and what follows
/// dropped; `\0` (everything) for a prefix of only 0xff bytes.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Pager {
    /// A pager over `prefix`, `page_keys` keys per page (at least 1).
    pub(crate) fn new(prefix: &[u8], page_keys: i64) -> Self {
        let page_keys = page_keys.max(1);
        Self {
            prefix: prefix.to_vec(),
            end: prefix_end(prefix),
            page_keys,
            limit: page_keys,
            from: prefix.to_vec(),
            revision: 0,
            restarts: 0,
        }
    }

    /// The Range to send now.
    pub(crate) fn request(&self) -> PageRequest {
        PageRequest { from: self.from.clone(), end: self.end.clone(), revision: self.revision, limit: self.limit }
    }

    /// The snapshot's revision (0 before the first page).
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// A page arrived: `last_key` is its last key, `more` etcd's flag that keys remain,
    /// `revision` its header's revision.
    pub(crate) fn on_page(&mut self, last_key: Option<&[u8]>, more: bool, revision: i64) -> Next {
        if self.revision == 0 {
            self.revision = revision;
        }
        self.limit = self.limit.saturating_mul(2).min(self.page_keys);
        match last_key {
            Some(last) if more => {
                self.from = last.to_vec();
                self.from.push(0);
                Next::Fetch
            }
            _ => Next::Done,
        }
    }

    /// A page request failed with `failure`.
    ///
    /// # Errors
    /// [`PageGaveUp`] when retrying cannot help.
    pub(crate) fn on_failure(&mut self, failure: PageFailure) -> Result<Next, PageGaveUp> {
        match failure {
            PageFailure::TooLarge if self.limit > 1 => {
                self.limit = (self.limit / 2).max(1);
                Ok(Next::Fetch)
            }
            PageFailure::TooLarge => Err(PageGaveUp::RecordTooLarge { from: self.from.clone() }),
            PageFailure::Compacted if self.restarts < MAX_RESTARTS => {
                self.restarts += 1;
                self.revision = 0;
                self.from.clone_from(&self.prefix);
                self.limit = self.page_keys;
                Ok(Next::Restart)
            }
            PageFailure::Compacted => Err(PageGaveUp::KeptCompacting),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake etcd: sorted keys with sizes, a current revision, a compacted-below revision, and
    /// a decode limit in bytes.
    struct Fake {
        keys: Vec<(Vec<u8>, usize)>,
        current: i64,
        compacted: i64,
        decode_limit: usize,
        requests: Vec<PageRequest>,
    }

    impl Fake {
        fn answer(&mut self, req: &PageRequest) -> Result<(Vec<Vec<u8>>, bool, i64), PageFailure> {
            self.requests.push(req.clone());
            if req.revision != 0 && req.revision < self.compacted {
                return Err(PageFailure::Compacted);
            }
            let in_range: Vec<&(Vec<u8>, usize)> =
                self.keys.iter().filter(|(k, _)| *k >= req.from && *k < req.end).collect();
            let limit = usize::try_from(req.limit).unwrap();
            let page: Vec<&(Vec<u8>, usize)> = in_range.iter().take(limit).copied().collect();
            if page.iter().map(|(_, size)| size).sum::<usize>() > self.decode_limit {
                return Err(PageFailure::TooLarge);
            }
            Ok((page.iter().map(|(k, _)| k.clone()).collect(), in_range.len() > limit, self.current))
        }

        /// Runs a pager to the end the way `EtcdStore::list` does; returns the keys collected.
        fn list(
            &mut self,
            page_keys: i64,
            mut between_pages: impl FnMut(&mut Self),
        ) -> Result<Vec<Vec<u8>>, PageGaveUp> {
            let mut pager = Pager::new(b"/p/", page_keys);
            let mut got = Vec::new();
            loop {
                let next = match self.answer(&pager.request()) {
                    Ok((keys, more, rev)) => {
                        let next = pager.on_page(keys.last().map(Vec::as_slice), more, rev);
                        got.extend(keys);
                        next
                    }
                    Err(f) => pager.on_failure(f)?,
                };
                match next {
                    Next::Done => return Ok(got),
                    Next::Restart => got.clear(),
                    Next::Fetch => {}
                }
                between_pages(self);
            }
        }
    }

    fn fake(n: usize, size: impl Fn(usize) -> usize) -> Fake {
        let keys = (0..n).map(|i| (format!("/p/{i:05}").into_bytes(), size(i))).collect();
        Fake { keys, current: 100, compacted: 0, decode_limit: 1000, requests: Vec::new() }
    }

    #[test]
    fn prefix_end_is_etcds() {
        assert_eq!(prefix_end(b"/coreos.com/network/subnets/"), b"/coreos.com/network/subnets0");
        assert_eq!(prefix_end(b"a\xff\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn pages_cover_every_key_once_at_one_revision() {
        let mut f = fake(25, |_| 1);
        let got = f.list(10, |_| {}).unwrap();
        assert_eq!(got, f.keys.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>());
        let revs: Vec<i64> = f.requests.iter().map(|r| r.revision).collect();
        assert_eq!(revs, [0, 100, 100], "first page at the current revision, the rest pinned to it");
        assert_eq!(f.requests[1].from, b"/p/00009\0");
        assert!(f.requests.iter().all(|r| r.end == b"/p0" && r.limit == 10));
    }

    #[test]
    fn empty_prefix_and_exact_multiple() {
        assert_eq!(fake(0, |_| 1).list(10, |_| {}).unwrap(), Vec::<Vec<u8>>::new());
        let mut f = fake(20, |_| 1);
        assert_eq!(f.list(10, |_| {}).unwrap().len(), 20);
    }

    #[test]
    fn a_page_too_large_is_asked_again_smaller_then_grows_back() {
        // Keys 10..13 are 600 bytes each: two of them overflow the 1000-byte decode limit.
        let mut f = fake(40, |i| if (10..13).contains(&i) { 600 } else { 1 });
        let got = f.list(8, |_| {}).unwrap();
        assert_eq!(got, f.keys.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(), "every key, once, in order");
        let limits: Vec<i64> = f.requests.iter().map(|r| r.limit).collect();
        assert_eq!(limits, [8, 8, 4, 2, 4, 2, 1, 2, 1, 2, 4, 8, 8, 8], "halved until it fits, then doubled back");
    }

    #[test]
    fn a_single_record_above_the_limit_gives_up_naming_where() {
        let mut f = fake(5, |i| if i == 3 { 5000 } else { 1 });
        assert_eq!(f.list(10, |_| {}), Err(PageGaveUp::RecordTooLarge { from: b"/p/00002\0".to_vec() }));
    }

    #[test]
    fn compaction_mid_list_restarts_at_the_new_revision() {
        let mut f = fake(30, |_| 1);
        let mut compacted_once = false;
        let got = f
            .list(10, |f| {
                // After the first page: a write and a compaction past the pinned revision.
                if !compacted_once {
                    compacted_once = true;
                    f.current = 120;
                    f.compacted = 110;
                }
            })
            .unwrap();
        assert_eq!(got.len(), 30, "nothing from the abandoned pass is kept");
        let revs: Vec<i64> = f.requests.iter().map(|r| r.revision).collect();
        assert_eq!(revs, [0, 100, 0, 120, 120]);
    }

    #[test]
    fn compacting_forever_gives_up() {
        let mut f = fake(30, |_| 1);
        let err = f.list(10, |f| {
            f.current += 10;
            f.compacted = f.current;
        });
        assert_eq!(err, Err(PageGaveUp::KeptCompacting));
        assert_eq!(f.requests.iter().filter(|r| r.revision == 0).count(), 1 + MAX_RESTARTS as usize);
    }
}
