//! Pod address allocation inside the node's subnet, keyed by CNI attachment.
//!
//! An attachment is `(container id, interface name)`, validated with the CNI spec's rules.
//! Allocation is idempotent (the same attachment gets the same address back, so a retried ADD
//! is harmless), never hands out the network address, the gateway (`.1`, the node's own
//! address) or the broadcast address, skips configured reservations, and searches round-robin
//! from the last address handed out, like host-local, so a just-released address is not reused
//! while peers may still cache it. [`PodAllocator::gc`] frees what the runtime no longer knows,
//! sparing records younger than a grace period (an ADD racing the runtime's list must not lose
//! its address: antrea#8239). Each operation runs under the [`PodStore`]'s lock, and every
//! failure undoes its partial reservation (host-local leaks the address when its second write
//! fails).
//!
//! No clock is read here: [`PodAllocator::gc`] takes `now`.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use tracing::info;

use crate::store::{PodRecord, PodStore, StoreError};

/// A CNI container id (`CNI_CONTAINERID`): `^[A-Za-z0-9][A-Za-z0-9_.\-]*$`.
#[derive(Clone, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct ContainerId(String);

/// A CNI interface name (`CNI_IFNAME`): 1 to 15 bytes, not `.` or `..`, no `/`, `:` or
/// whitespace (Linux's `IFNAMSIZ` and `dev_valid_name`).
#[derive(Clone, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct IfName(String);

/// One CNI attachment: what an address is allocated to.
#[derive(Clone, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct Attachment {
    /// The container.
    pub container_id: ContainerId,
    /// Its interface.
    pub if_name: IfName,
}

/// Why a container id or interface name was rejected.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
pub enum AttachmentError {
    /// `CNI_CONTAINERID` breaks the spec's pattern.
    #[error("CNI_CONTAINERID: {value:?} {reason}")]
    ContainerId {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// `CNI_IFNAME` breaks the spec's rules.
    #[error("CNI_IFNAME: {value:?} {reason}")]
    IfName {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: &'static str,
    },
}

impl ContainerId {
    /// Validates a container id.
    ///
    /// # Errors
    /// [`AttachmentError::ContainerId`] saying which rule failed.
    pub fn new(value: &str) -> Result<Self, AttachmentError> {
        let err = |reason| AttachmentError::ContainerId { value: value.to_owned(), reason };
        let mut bytes = value.bytes();
        match bytes.next() {
            None => return Err(err("is empty")),
            Some(b) if !b.is_ascii_alphanumeric() => return Err(err("must start with a letter or digit")),
            Some(_) => {}
        }
        if !bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')) {
            return Err(err("may only contain letters, digits, '_', '.' and '-'"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl IfName {
    /// Validates an interface name.
    ///
    /// # Errors
    /// [`AttachmentError::IfName`] saying which rule failed.
    pub fn new(value: &str) -> Result<Self, AttachmentError> {
        let err = |reason| AttachmentError::IfName { value: value.to_owned(), reason };
        if value.is_empty() {
            return Err(err("is empty"));
        }
        if value.len() > 15 {
            return Err(err("is longer than 15 bytes"));
        }
        if value == "." || value == ".." {
            return Err(err("may not be . or .."));
        }
        if value.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
            return Err(err("may not contain '/', ':' or whitespace"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Attachment {
    /// Validates both parts.
    ///
    /// # Errors
    /// The first invalid part.
    pub fn new(container_id: &str, if_name: &str) -> Result<Self, AttachmentError> {
        Ok(Self { container_id: ContainerId::new(container_id)?, if_name: IfName::new(if_name)? })
    }
}

impl fmt::Display for Attachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.container_id.0, self.if_name.0)
    }
}

/// An allocated pod address with what the pod needs to use it.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct PodAddress {
    /// The pod's address with the subnet's prefix length, e.g. `10.244.1.7/24`.
    pub address: Ipv4Net,
    /// The gateway: the subnet's first address, which the node holds.
    pub gateway: Ipv4Addr,
}

/// Why an allocation failed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// Every usable address of the subnet is taken.
    #[error("no free address in {subnet}: all {usable} usable addresses are in use (free some with GC)")]
    Exhausted {
        /// The node's subnet.
        subnet: Ipv4Net,
        /// How many addresses can be handed out at all.
        usable: u64,
    },
    /// A requested address is held by another attachment.
    #[error("requested address {ip} is already allocated to {holder}")]
    RequestedInUse {
        /// The address.
        ip: Ipv4Addr,
        /// Its holder (or "an unreadable record").
        holder: String,
    },
    /// A requested address cannot be handed out.
    #[error("requested address {ip} {reason}")]
    RequestedUnusable {
        /// The address.
        ip: Ipv4Addr,
        /// Why (outside the subnet, the gateway, …).
        reason: String,
    },
    /// The subnet has no room for a gateway and a pod.
    #[error("subnet {subnet} is too small for pods (need /30 or larger)")]
    SubnetTooSmall {
        /// The subnet.
        subnet: Ipv4Net,
    },
    /// The store failed; nothing was allocated.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Allocates pod addresses in one subnet, persisted in a [`PodStore`].
#[derive(Debug)]
pub struct PodAllocator<S> {
    store: S,
    subnet: Ipv4Net,
    reserved: BTreeSet<Ipv4Addr>,
    gc_grace: Duration,
}

impl<S: PodStore> PodAllocator<S> {
    /// Default grace period: GC spares records younger than this.
    pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(60);

    /// An allocator for `subnet` (the node's lease) over `store`.
    ///
    /// # Errors
    /// [`PodError::SubnetTooSmall`] for /31 and /32.
    pub fn new(store: S, subnet: Ipv4Net) -> Result<Self, PodError> {
        let subnet = subnet.trunc();
        if subnet.prefix_len() > 30 {
            return Err(PodError::SubnetTooSmall { subnet });
        }
        Ok(Self { store, subnet, reserved: BTreeSet::new(), gc_grace: Self::DEFAULT_GC_GRACE })
    }

    /// Addresses never handed out dynamically; [`Self::allocate_requested`] can still give them.
    pub fn with_reserved(mut self, reserved: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        self.reserved.extend(reserved);
        self
    }

    /// Sets the GC grace period.
    pub fn with_gc_grace(mut self, grace: Duration) -> Self {
        self.gc_grace = grace;
        self
    }

    /// The subnet addresses come from.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The gateway: the subnet's first address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()).wrapping_add(1))
    }

    fn first_pod(&self) -> u32 {
        u32::from(self.subnet.network()).wrapping_add(2)
    }

    fn last_pod(&self) -> u32 {
        u32::from(self.subnet.broadcast()).wrapping_sub(1)
    }

    fn address(&self, ip: Ipv4Addr) -> PodAddress {
        PodAddress {
            address: Ipv4Net::new(ip, self.subnet.prefix_len()).unwrap_or(self.subnet),
            gateway: self.gateway(),
        }
    }

    /// Why `ip` can never be a pod address here, if it cannot.
    fn unusable(&self, ip: Ipv4Addr) -> Option<&'static str> {
        let a = u32::from(ip);
        if !self.subnet.contains(&ip) {
            Some("is outside the node's subnet")
        } else if ip == self.subnet.network() {
            Some("is the subnet's network address")
        } else if ip == self.gateway() {
            Some("is the gateway")
        } else if ip == self.subnet.broadcast() {
            Some("is the subnet's broadcast address")
        } else if a < self.first_pod() || a > self.last_pod() {
            Some("is not a host address of the subnet")
        } else {
            None
        }
    }

    /// Finds the attachment's valid record; drops records of it that no longer fit the subnet
    /// (the node moved to a new subnet).
    fn existing(&self, records: &[PodRecord], who: &Attachment) -> Result<Option<Ipv4Addr>, StoreError> {
        let mut found = None;
        for r in records.iter().filter(|r| r.owner.as_ref() == Some(who)) {
            if self.unusable(r.ip).is_none() && found.is_none() {
                found = Some(r.ip);
            } else if self.unusable(r.ip).is_some() {
                self.store.remove(r.ip)?;
            }
        }
        Ok(found)
    }

    /// Claims `ip` for `who` and moves the round-robin cursor; undoes the claim if the cursor
    /// cannot be written, so a failure leaves nothing behind.
    fn claim(&self, ip: Ipv4Addr, who: &Attachment) -> Result<bool, StoreError> {
        if !self.store.claim(ip, who)? {
            return Ok(false);
        }
        if let Err(e) = self.store.set_last_reserved(ip) {
            self.store.remove(ip)?;
            return Err(e);
        }
        Ok(true)
    }

    /// The attachment's address: the one it already has, else the next free one.
    ///
    /// # Errors
    /// [`PodError::Exhausted`] when the subnet is full; store errors (nothing is left behind).
    pub fn allocate(&self, who: &Attachment) -> Result<PodAddress, PodError> {
        self.store.with_lock(|store| {
            let records = store.records()?;
            if let Some(ip) = self.existing(&records, who)? {
                return Ok(self.address(ip));
            }
            let taken: HashSet<Ipv4Addr> = records.iter().map(|r| r.ip).collect();
            let (first, last) = (self.first_pod(), self.last_pod());
            let span = u64::from(last - first) + 1;
            let start = match store.last_reserved()? {
                Some(prev) if self.unusable(prev).is_none() => u64::from(u32::from(prev) - first) + 1,
                _ => 0,
            };
            for i in 0..span {
                let offset = (start + i) % span;
                let Some(ip) = u32::try_from(u64::from(first) + offset).ok().map(Ipv4Addr::from) else { continue };
                if taken.contains(&ip) || self.reserved.contains(&ip) {
                    continue;
                }
                if self.claim(ip, who)? {
                    info!(ip = %ip, attachment = %who, "pod address allocated");
                    return Ok(self.address(ip));
                }
            }
            Err(PodError::Exhausted { subnet: self.subnet, usable: span })
        })
    }

    /// Allocates a specific address (CNI `IP=` argument); idempotent for the same attachment.
    /// Reserved addresses may be requested.
    ///
    /// # Errors
    /// [`PodError::RequestedUnusable`], [`PodError::RequestedInUse`], store errors.
    pub fn allocate_requested(&self, who: &Attachment, ip: Ipv4Addr) -> Result<PodAddress, PodError> {
        if let Some(reason) = self.unusable(ip) {
            return Err(PodError::RequestedUnusable { ip, reason: reason.to_owned() });
        }
        self.store.with_lock(|store| {
            let records = store.records()?;
            if let Some(current) = self.existing(&records, who)? {
                if current == ip {
                    return Ok(self.address(ip));
                }
                return Err(PodError::RequestedUnusable {
                    ip,
                    reason: format!("differs from the address {current} already allocated to {who}"),
                });
            }
            if let Some(r) = records.iter().find(|r| r.ip == ip) {
                let holder = r.owner.as_ref().map_or_else(|| "an unreadable record".to_owned(), ToString::to_string);
                return Err(PodError::RequestedInUse { ip, holder });
            }
            if self.claim(ip, who)? {
                info!(ip = %ip, attachment = %who, "requested pod address allocated");
                Ok(self.address(ip))
            } else {
                Err(PodError::RequestedInUse { ip, holder: "a concurrent writer".into() })
            }
        })
    }

    /// The attachment's address, if it has one (CNI CHECK).
    ///
    /// # Errors
    /// Store errors.
    pub fn get(&self, who: &Attachment) -> Result<Option<PodAddress>, PodError> {
        self.store.with_lock(|store| {
            let records = store.records()?;
            Ok(records
                .iter()
                .find(|r| r.owner.as_ref() == Some(who) && self.unusable(r.ip).is_none())
                .map(|r| self.address(r.ip)))
        })
    }

    /// Frees the attachment's address(es); releasing an unknown attachment is not an error (CNI
    /// DEL must be idempotent). Returns the freed addresses.
    ///
    /// # Errors
    /// Store errors.
    pub fn release(&self, who: &Attachment) -> Result<Vec<Ipv4Addr>, PodError> {
        self.store.with_lock(|store| {
            let mut freed = Vec::new();
            for r in store.records()?.iter().filter(|r| r.owner.as_ref() == Some(who)) {
                if store.remove(r.ip)? {
                    freed.push(r.ip);
                }
            }
            if !freed.is_empty() {
                info!(attachment = %who, addresses = ?freed, "pod address released");
            }
            Ok(freed)
        })
    }

    /// Frees every record whose attachment is not in `valid` and that is at least the grace
    /// period old at `now`, including unreadable records. An empty `valid` list frees all of
    /// those (it is meaningful in CNI GC). Returns the freed records.
    ///
    /// # Errors
    /// Store errors; records freed before the error stay freed.
    pub fn gc(&self, valid: &[Attachment], now: SystemTime) -> Result<Vec<PodRecord>, PodError> {
        let valid: HashSet<&Attachment> = valid.iter().collect();
        self.store.with_lock(|store| {
            let mut freed = Vec::new();
            for r in store.records()? {
                if r.owner.as_ref().is_some_and(|o| valid.contains(o)) {
                    continue;
                }
                let young = r.allocated_at.checked_add(self.gc_grace).is_some_and(|t| now < t);
                if young {
                    continue;
                }
                if store.remove(r.ip)? {
                    freed.push(r);
                }
            }
            if !freed.is_empty() {
                info!(freed = freed.len(), "pod address gc");
            }
            Ok(freed)
        })
    }

    /// Every allocation record.
    ///
    /// # Errors
    /// Store errors.
    pub fn allocations(&self) -> Result<Vec<PodRecord>, PodError> {
        Ok(self.store.records()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FilePodStore;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    /// An in-memory PodStore with failure injection for the undo paths.
    struct MemPods {
        records: RefCell<BTreeMap<Ipv4Addr, PodRecord>>,
        last: RefCell<Option<Ipv4Addr>>,
        fail_set_last: RefCell<bool>,
        clock: RefCell<SystemTime>,
    }

    impl Default for MemPods {
        fn default() -> Self {
            Self {
                records: RefCell::default(),
                last: RefCell::default(),
                fail_set_last: RefCell::default(),
                clock: RefCell::new(SystemTime::UNIX_EPOCH),
            }
        }
    }

    impl PodStore for MemPods {
        fn with_lock<T, E: From<StoreError>>(&self, f: impl FnOnce(&Self) -> Result<T, E>) -> Result<T, E> {
            f(self)
        }
        fn records(&self) -> Result<Vec<PodRecord>, StoreError> {
            Ok(self.records.borrow().values().cloned().collect())
        }
        fn claim(&self, ip: Ipv4Addr, owner: &Attachment) -> Result<bool, StoreError> {
            let mut r = self.records.borrow_mut();
            if r.contains_key(&ip) {
                return Ok(false);
            }
            r.insert(ip, PodRecord { ip, owner: Some(owner.clone()), allocated_at: *self.clock.borrow() });
            Ok(true)
        }
        fn remove(&self, ip: Ipv4Addr) -> Result<bool, StoreError> {
            Ok(self.records.borrow_mut().remove(&ip).is_some())
        }
        fn last_reserved(&self) -> Result<Option<Ipv4Addr>, StoreError> {
            Ok(*self.last.borrow())
        }
        fn set_last_reserved(&self, ip: Ipv4Addr) -> Result<(), StoreError> {
            if *self.fail_set_last.borrow() {
                return Err(StoreError::Io {
                    path: "last_reserved_ip.0".into(),
                    source: std::io::Error::other("no space left on device"),
                });
            }
            *self.last.borrow_mut() = Some(ip);
            Ok(())
        }
    }

    fn att(id: &str) -> Attachment {
        Attachment::new(id, "eth0").unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn alloc(subnet: &str) -> PodAllocator<MemPods> {
        PodAllocator::new(MemPods::default(), subnet.parse().unwrap()).unwrap()
    }

    #[test]
    fn attachment_validation_table() {
        let ids = [
            ("abc", true),
            ("A1_b.c-d", true),
            ("0", true),
            ("", false),
            ("-abc", false),
            ("_a", false),
            ("a/b", false),
            ("a b", false),
            ("ä", false),
        ];
        for (id, ok) in ids {
            assert_eq!(ContainerId::new(id).is_ok(), ok, "container id {id:?}");
        }
        let names = [
            ("eth0", true),
            ("a23456789012345", true),
            ("a234567890123456", false),
            ("", false),
            (".", false),
            ("..", false),
            ("...", true),
            ("a/b", false),
            ("a:b", false),
            ("a b", false),
            ("a\tb", false),
        ];
        for (name, ok) in names {
            assert_eq!(IfName::new(name).is_ok(), ok, "ifname {name:?}");
        }
        assert_eq!(
            Attachment::new("x", "a/b").unwrap_err().to_string(),
            "CNI_IFNAME: \"a/b\" may not contain '/', ':' or whitespace"
        );
    }

    #[test]
    fn idempotent_and_skips_network_gateway_broadcast() {
        let a = alloc("10.244.1.0/30");
        let first = a.allocate(&att("c1")).unwrap();
        assert_eq!(first.address, "10.244.1.2/30".parse::<Ipv4Net>().unwrap());
        assert_eq!(first.gateway, ip("10.244.1.1"));
        assert_eq!(a.allocate(&att("c1")).unwrap(), first, "same attachment, same address");
        let err = a.allocate(&att("c2")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no free address in 10.244.1.0/30: all 1 usable addresses are in use (free some with GC)"
        );
        assert_eq!(a.release(&att("c1")).unwrap(), vec![ip("10.244.1.2")]);
        assert_eq!(a.release(&att("c1")).unwrap(), Vec::<Ipv4Addr>::new(), "DEL is idempotent");
        assert!(a.allocate(&att("c2")).is_ok());
    }

    #[test]
    fn fills_a_24_exactly_once_each_then_exhausts() {
        let a = alloc("10.244.7.0/24").with_reserved([ip("10.244.7.100")]);
        let mut seen = BTreeSet::new();
        for i in 0..252 {
            let got = a.allocate(&att(&format!("c{i}"))).unwrap().address.addr();
            assert!(seen.insert(got), "{got} handed out twice");
        }
        assert!(!seen.contains(&ip("10.244.7.0")) && !seen.contains(&ip("10.244.7.1")));
        assert!(!seen.contains(&ip("10.244.7.255")) && !seen.contains(&ip("10.244.7.100")));
        assert!(matches!(a.allocate(&att("one-more")), Err(PodError::Exhausted { usable: 253, .. })));
        // The reservation can still be requested explicitly.
        assert_eq!(
            a.allocate_requested(&att("one-more"), ip("10.244.7.100")).unwrap().address.addr(),
            ip("10.244.7.100")
        );
    }

    #[test]
    fn round_robin_does_not_reuse_a_just_released_address() {
        let a = alloc("10.244.1.0/24");
        let x = a.allocate(&att("c1")).unwrap().address.addr();
        a.release(&att("c1")).unwrap();
        let y = a.allocate(&att("c2")).unwrap().address.addr();
        assert_ne!(x, y);
        assert_eq!(y, ip("10.244.1.3"));
    }

    #[test]
    fn requested_address_rules() {
        let a = alloc("10.244.1.0/24");
        let cases = [
            ("10.244.1.0", "is the subnet's network address"),
            ("10.244.1.1", "is the gateway"),
            ("10.244.1.255", "is the subnet's broadcast address"),
            ("10.244.2.5", "is outside the node's subnet"),
        ];
        for (addr, reason) in cases {
            let err = a.allocate_requested(&att("c1"), ip(addr)).unwrap_err().to_string();
            assert_eq!(err, format!("requested address {addr} {reason}"));
        }
        a.allocate_requested(&att("c1"), ip("10.244.1.9")).unwrap();
        a.allocate_requested(&att("c1"), ip("10.244.1.9")).unwrap();
        let err = a.allocate_requested(&att("c2"), ip("10.244.1.9")).unwrap_err().to_string();
        assert_eq!(err, "requested address 10.244.1.9 is already allocated to c1/eth0");
    }

    #[test]
    fn failed_cursor_write_undoes_the_claim() {
        let a = alloc("10.244.1.0/24");
        *a.store().fail_set_last.borrow_mut() = true;
        assert!(matches!(a.allocate(&att("c1")), Err(PodError::Store(_))));
        assert!(a.allocations().unwrap().is_empty(), "no leaked address");
        *a.store().fail_set_last.borrow_mut() = false;
        assert!(a.allocate(&att("c1")).is_ok());
    }

    #[test]
    fn gc_frees_only_stale_unlisted_records() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let a = alloc("10.244.1.0/24").with_gc_grace(Duration::from_secs(60));
        *a.store().clock.borrow_mut() = t0;
        for id in ["live", "leak1", "leak2"] {
            a.allocate(&att(id)).unwrap();
        }
        *a.store().clock.borrow_mut() = t0 + Duration::from_secs(100);
        a.allocate(&att("fresh")).unwrap();
        let freed = a.gc(&[att("live")], t0 + Duration::from_secs(120)).unwrap();
        let freed: BTreeSet<_> = freed.iter().filter_map(|r| r.owner.clone()).collect();
        assert_eq!(freed, BTreeSet::from([att("leak1"), att("leak2")]), "fresh is inside the grace period");
        let left: BTreeSet<_> = a.allocations().unwrap().into_iter().filter_map(|r| r.owner).collect();
        assert_eq!(left, BTreeSet::from([att("live"), att("fresh")]));
        // An empty valid list frees everything old enough.
        assert_eq!(a.gc(&[], t0 + Duration::from_secs(1000)).unwrap().len(), 2);
    }

    #[test]
    fn moved_subnet_drops_the_old_record() {
        let store = MemPods::default();
        store.claim(ip("10.244.9.5"), &att("c1")).unwrap();
        let a = PodAllocator::new(store, "10.244.1.0/24".parse().unwrap()).unwrap();
        assert_eq!(a.allocate(&att("c1")).unwrap().address.addr(), ip("10.244.1.2"));
        assert_eq!(a.allocations().unwrap().len(), 1);
    }

    #[test]
    fn too_small_subnets_are_refused() {
        for s in ["10.244.1.0/31", "10.244.1.0/32"] {
            assert!(matches!(
                PodAllocator::new(MemPods::default(), s.parse().unwrap()),
                Err(PodError::SubnetTooSmall { .. })
            ));
        }
    }

    #[test]
    fn file_store_concurrent_threads_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let subnet: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let results = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..4 {
                let (dir, results) = (dir.path(), &results);
                s.spawn(move || {
                    let a = PodAllocator::new(FilePodStore::open(dir).unwrap(), subnet).unwrap();
                    for i in 0..25 {
                        let got = a.allocate(&att(&format!("t{t}-c{i}"))).unwrap();
                        results.lock().unwrap().push(got.address.addr());
                    }
                });
            }
        });
        let all = results.into_inner().unwrap();
        let unique: BTreeSet<_> = all.iter().collect();
        assert_eq!((all.len(), unique.len()), (100, 100));
    }
}
