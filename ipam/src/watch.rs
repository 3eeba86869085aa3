//! Lease events and the re-list-and-diff that replaces a watch that lost its history.
//!
//! A watch that falls behind etcd's compaction window cannot be resumed. flannel once answered
//! that by emitting "removed" for every subnet and "added" for the new list, which blackholed
//! traffic in between (flannel#126, #294). weft re-lists and emits only the difference between
//! what the caller already knew and the new list ([`resync`]), so subnets that did not change are
//! never touched.

use std::collections::BTreeMap;

use ipnet::Ipv4Net;

use crate::lease::SubnetLease;

/// A change to the set of leases.
#[derive(Clone, Debug, PartialEq)]
pub enum LeaseEvent {
    /// `subnet` is now held with these attributes: a new lease, or a lease whose holder or
    /// attributes changed. Apply as an upsert. A renewal that changes only the expiration is not
    /// an event.
    Added(SubnetLease),
    /// Nobody holds this subnet any more (released, deleted, or expired).
    Removed(Ipv4Net),
}

impl LeaseEvent {
    /// The subnet the event is about.
    pub fn subnet(&self) -> Ipv4Net {
        match self {
            Self::Added(lease) => lease.subnet,
            Self::Removed(subnet) => *subnet,
        }
    }
}

/// The events that turn `old` into `new`: `Removed` for subnets only in `old`, `Added` for subnets
/// only in `new` or whose attributes differ. Expiration-only differences are not events.
/// Output is ordered by subnet, with at most one event per subnet. Only a `new` that really is
/// empty removes everything.
pub fn resync(old: &[SubnetLease], new: &[SubnetLease]) -> Vec<LeaseEvent> {
    let old: BTreeMap<Ipv4Net, &SubnetLease> = old.iter().map(|l| (l.subnet, l)).collect();
    let new: BTreeMap<Ipv4Net, &SubnetLease> = new.iter().map(|l| (l.subnet, l)).collect();
    let mut events = Vec::new();
    for (subnet, lease) in &new {
        match old.get(subnet) {
            Some(before) if before.attrs == lease.attrs => {}
            _ => events.push(LeaseEvent::Added((*lease).clone())),
        }
    }
    for subnet in old.keys() {
        if !new.contains_key(subnet) {
            events.push(LeaseEvent::Removed(*subnet));
        }
    }
    events.sort_by_key(LeaseEvent::subnet);
    events
}

/// Applies `events` to a lease map (the daemon's view, or a watch stream's own).
pub fn apply(known: &mut BTreeMap<Ipv4Net, SubnetLease>, events: &[LeaseEvent]) {
    for event in events {
        match event {
            LeaseEvent::Added(lease) => {
                known.insert(lease.subnet, lease.clone());
            }
            LeaseEvent::Removed(subnet) => {
                known.remove(subnet);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeaseAttrs;
    use crate::store::Revision;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;
    use std::time::{Duration, SystemTime};

    fn lease(third: u8, host: u8, exp_secs: u64) -> SubnetLease {
        SubnetLease {
            subnet: Ipv4Net::new(Ipv4Addr::new(10, 244, third, 0), 24).unwrap(),
            attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, host), "udp"),
            expiration: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(exp_secs)),
            created: Revision(0),
        }
    }

    #[test]
    fn diff_table() {
        let a = lease(1, 1, 10);
        let b = lease(2, 2, 10);
        let b_renewed = lease(2, 2, 99);
        let b_moved = lease(2, 7, 10);
        let c = lease(3, 3, 10);
        let cases: Vec<(Vec<SubnetLease>, Vec<SubnetLease>, Vec<LeaseEvent>)> = vec![
            (vec![], vec![], vec![]),
            (vec![a.clone()], vec![a.clone()], vec![]),
            (vec![a.clone(), b.clone()], vec![a.clone(), b_renewed.clone()], vec![]),
            (vec![a.clone(), b.clone()], vec![a.clone(), b_moved.clone()], vec![LeaseEvent::Added(b_moved.clone())]),
            (
                vec![a.clone(), b.clone()],
                vec![b.clone(), c.clone()],
                vec![LeaseEvent::Removed(a.subnet), LeaseEvent::Added(c.clone())],
            ),
            (vec![a.clone()], vec![], vec![LeaseEvent::Removed(a.subnet)]),
        ];
        for (old, new, want) in cases {
            assert_eq!(resync(&old, &new), want, "old {old:?} new {new:?}");
        }
    }

    proptest! {
        /// Applying the diff to the old set yields the new set (up to expiration-only changes),
        /// and subnets present and unchanged in both never produce an event.
        #[test]
        fn diff_then_apply_converges(old in proptest::collection::btree_map(0u8..20, (1u8..4, 0u64..3), 0..12),
                                     new in proptest::collection::btree_map(0u8..20, (1u8..4, 0u64..3), 0..12)) {
            let old: Vec<_> = old.into_iter().map(|(s, (h, e))| lease(s, h, e)).collect();
            let new: Vec<_> = new.into_iter().map(|(s, (h, e))| lease(s, h, e)).collect();
            let events = resync(&old, &new);
            let mut known: BTreeMap<_, _> = old.iter().map(|l| (l.subnet, l.clone())).collect();
            apply(&mut known, &events);
            let got: Vec<_> = known.values().map(|l| (l.subnet, l.attrs.clone())).collect();
            let want: Vec<_> = new.iter().map(|l| (l.subnet, l.attrs.clone())).collect();
            prop_assert_eq!(got, want);
            for e in &events {
                let before = old.iter().find(|l| l.subnet == e.subnet());
                let after = new.iter().find(|l| l.subnet == e.subnet());
                prop_assert!(before.map(|l| &l.attrs) != after.map(|l| &l.attrs));
            }
        }
    }
}
