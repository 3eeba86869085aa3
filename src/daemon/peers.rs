//! Leases → peers: which records of the lease store become routes, and why the others do not.
//!
//! A lease record is input like a packet: anyone who can write to the store
//! can write one, and one record naming the whole cluster network with an attacker's PublicIP
//! would otherwise capture every node's cross-node traffic. So each record is checked on its
//! own against the network config, then against the others:
//!
//! 1. its subnet lies inside the cluster network and has exactly the configured `SubnetLen`
//!    (`outside_network`, `wrong_subnet_len`); records of one length are disjoint or equal, and
//!    equal ones share a key, so the accepted set can never overlap;
//! 2. it is not our subnet held by someone else (`overlaps_ours`);
//! 3. its PublicIP is a unicast address a node can have (`bad_public_ip`); a record with *our*
//!    PublicIP is our own, stale or current, and never a peer;
//! 4. it speaks our backend (`other_backend`), and for VXLAN publishes our VNI and a unicast
//!    VtepMAC, for WireGuard a valid PublicKey that is not ours (`bad_backend_data`);
//! 5. no older record shares its PublicIP (`duplicate_endpoint`), its VtepMAC
//!    (`duplicate_mac`) or its PublicKey (`duplicate_key`). "Older" is the store's creation revision, never the address, so a
//!    record written later cannot displace a peer already in use; when the older one goes, the
//!    next in line takes its place.
//!
//! [`LeasePeers`] keeps the verdict of every record and updates it per store event in
//! O(k log n) for k changed records (plus the records sharing their PublicIP or MAC), logging
//! each record's verdict only when it changes. It is sans-IO: the lease task feeds it events and
//! rebuilds the route table from [`LeasePeers::peers`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use tracing::{info, warn};
use weft_forwarder::wire::ethernet::MacAddr;
use weft_forwarder::wireguard::PublicKey;
use weft_ipam::{LeaseEvent, Revision, SubnetLease};

use crate::config::Peer;

/// What a lease record must agree with to become a peer.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct PeerRules {
    /// The cluster network.
    pub network: Ipv4Net,
    /// The configured `SubnetLen`.
    pub subnet_len: u8,
    /// Our subnet.
    pub ours: Ipv4Net,
    /// Our PublicIP.
    pub public_ip: Ipv4Addr,
    /// Our backend type (`udp`, `vxlan`, `wireguard`).
    pub backend: String,
    /// Our VNI, for VXLAN.
    pub vni: Option<u32>,
    /// The port every node listens on.
    pub port: u16,
    /// Our WireGuard public key (`wireguard`): every record must publish a valid key of its
    /// own (BackendData `PublicKey`), never ours.
    pub public_key: Option<PublicKey>,
}

/// Why a lease record is not a peer. The labels are stable: they are `weft status` keys.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum Refusal {
    /// The subnet is not inside the cluster network.
    OutsideNetwork,
    /// The subnet is not of the configured `SubnetLen`.
    WrongSubnetLen,
    /// Someone else's record for our subnet.
    OverlapsOurs,
    /// The PublicIP is not a unicast address a peer can have.
    BadPublicIp,
    /// Another backend type.
    OtherBackend,
    /// VXLAN data without our VNI or a unicast VtepMAC.
    BadBackendData,
    /// An older record has the same PublicIP.
    DuplicateEndpoint,
    /// An older record has the same VtepMAC.
    DuplicateMac,
    /// An older record has the same WireGuard PublicKey.
    DuplicateKey,
}

impl Refusal {
    /// Every reason, for counters.
    pub const ALL: [Refusal; 9] = [
        Self::OutsideNetwork,
        Self::WrongSubnetLen,
        Self::OverlapsOurs,
        Self::BadPublicIp,
        Self::OtherBackend,
        Self::BadBackendData,
        Self::DuplicateEndpoint,
        Self::DuplicateMac,
        Self::DuplicateKey,
    ];

    /// The label in `weft status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutsideNetwork => "outside_network",
            Self::WrongSubnetLen => "wrong_subnet_len",
            Self::OverlapsOurs => "overlaps_ours",
            Self::BadPublicIp => "bad_public_ip",
            Self::OtherBackend => "other_backend",
            Self::BadBackendData => "bad_backend_data",
            Self::DuplicateEndpoint => "duplicate_endpoint",
            Self::DuplicateMac => "duplicate_mac",
            Self::DuplicateKey => "duplicate_key",
        }
    }
}

/// A record currently refused, as `weft status` shows it.
#[derive(Clone, Debug, Eq, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct RefusedLease {
    /// The record's subnet.
    pub subnet: String,
    /// Its PublicIP.
    pub public_ip: String,
    /// Why (a [`Refusal`] label).
    pub reason: String,
}

/// What one record is to us.
#[derive(Clone, Debug, PartialEq)]
enum Verdict {
    /// Our own record (our PublicIP), current or stale.
    Own,
    /// Passed the checks on its own; a peer unless an older record shares its IP or MAC.
    Candidate(Peer),
    /// Refused on its own merits.
    Refused(Refusal),
}

#[derive(Clone, Debug)]
struct Entry {
    lease: SubnetLease,
    verdict: Verdict,
}

/// Every lease record the store holds and what each is to us (see the module docs).
#[derive(Debug)]
pub struct LeasePeers {
    rules: PeerRules,
    entries: BTreeMap<Ipv4Net, Entry>,
    /// Candidates by PublicIP, oldest first.
    by_ip: HashMap<Ipv4Addr, BTreeSet<(Revision, Ipv4Net)>>,
    /// Candidates by VtepMAC (vxlan) or PublicKey (wireguard), oldest first.
    by_mac: HashMap<Identity, BTreeSet<(Revision, Ipv4Net)>>,
    /// Records refused since start, by reason: each distinct record version counts once.
    refused_total: BTreeMap<Refusal, u64>,
}

/// What a peer must not share with an older one besides its PublicIP: its VTEP MAC, or its
/// WireGuard key.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
enum Identity {
    Mac(MacAddr),
    Key(PublicKey),
}

impl Identity {
    fn of(p: &Peer) -> Option<Self> {
        p.mac.map(Self::Mac).or(p.public_key.map(Self::Key))
    }

    fn duplicate(self) -> Refusal {
        match self {
            Self::Mac(_) => Refusal::DuplicateMac,
            Self::Key(_) => Refusal::DuplicateKey,
        }
    }
}

fn candidate_identity(v: &Verdict) -> Option<Identity> {
    match v {
        Verdict::Candidate(p) => Identity::of(p),
        _ => None,
    }
}

/// Whether a PublicIP can be a peer's underlay address.
fn unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.octets()[0] == 0
        || ip.octets()[0] >= 240)
}

impl LeasePeers {
    /// An empty set under `rules`.
    pub fn new(rules: PeerRules) -> Self {
        Self {
            rules,
            entries: BTreeMap::new(),
            by_ip: HashMap::new(),
            by_mac: HashMap::new(),
            refused_total: BTreeMap::new(),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> &PeerRules {
        &self.rules
    }

    /// Checks one record on its own.
    fn judge(&self, l: &SubnetLease) -> Verdict {
        let r = &self.rules;
        if l.attrs.public_ip == r.public_ip {
            return Verdict::Own;
        }
        let refuse = Verdict::Refused;
        if !r.network.contains(&l.subnet) {
            return refuse(Refusal::OutsideNetwork);
        }
        if l.subnet.prefix_len() != r.subnet_len {
            return refuse(Refusal::WrongSubnetLen);
        }
        if l.subnet == r.ours {
            return refuse(Refusal::OverlapsOurs);
        }
        if !unicast(l.attrs.public_ip) {
            return refuse(Refusal::BadPublicIp);
        }
        if l.attrs.backend_type != r.backend {
            return refuse(Refusal::OtherBackend);
        }
        let mac = match r.vni {
            None => None,
            Some(ours) => {
                let data = &l.attrs.backend_data;
                let vni_ok = data.get("VNI").and_then(serde_json::Value::as_u64).is_none_or(|v| v == u64::from(ours));
                let mac = data
                    .get("VtepMAC")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|m| m.parse::<MacAddr>().ok())
                    .filter(|m| m.is_valid_source());
                match mac {
                    Some(m) if vni_ok => Some(m),
                    _ => return refuse(Refusal::BadBackendData),
                }
            }
        };
        let public_key = match r.public_key {
            None => None,
            Some(ours) => {
                let key = l
                    .attrs
                    .backend_data
                    .get("PublicKey")
                    .and_then(serde_json::Value::as_str)
                    .and_then(|k| k.parse::<PublicKey>().ok())
                    .filter(|k| *k != ours);
                match key {
                    Some(k) => Some(k),
                    None => return refuse(Refusal::BadBackendData),
                }
            }
        };
        Verdict::Candidate(Peer {
            name: l.key().to_string(),
            subnet: l.subnet,
            subnet_v6: None,
            endpoint: SocketAddr::new(IpAddr::V4(l.attrs.public_ip), r.port),
            mac,
            public_key,
            mtu: None,
        })
    }

    /// Whether the candidate at `subnet` is a peer now: no older candidate shares its IP or MAC.
    fn accepted(&self, subnet: Ipv4Net) -> Result<&Peer, Option<Refusal>> {
        let Some(e) = self.entries.get(&subnet) else { return Err(None) };
        match &e.verdict {
            Verdict::Own => Err(None),
            Verdict::Refused(r) => Err(Some(*r)),
            Verdict::Candidate(p) => {
                let me = (e.lease.created, subnet);
                let first = |set: Option<&BTreeSet<(Revision, Ipv4Net)>>| set.and_then(|s| s.first()).copied();
                if first(self.by_ip.get(&e.lease.attrs.public_ip)).is_some_and(|f| f != me) {
                    return Err(Some(Refusal::DuplicateEndpoint));
                }
                if let Some(id) = Identity::of(p) {
                    if first(self.by_mac.get(&id)).is_some_and(|f| f != me) {
                        return Err(Some(id.duplicate()));
                    }
                }
                Ok(p)
            }
        }
    }

    /// The records whose acceptance can change when `subnet`'s record comes or goes: itself and
    /// the candidates sharing its PublicIP or MAC.
    fn neighbourhood(&self, subnet: Ipv4Net, out: &mut BTreeSet<Ipv4Net>) {
        out.insert(subnet);
        let Some(e) = self.entries.get(&subnet) else { return };
        if let Some(set) = self.by_ip.get(&e.lease.attrs.public_ip) {
            out.extend(set.iter().map(|(_, s)| *s));
        }
        if let Some(id) = candidate_identity(&e.verdict) {
            if let Some(set) = self.by_mac.get(&id) {
                out.extend(set.iter().map(|(_, s)| *s));
            }
        }
    }

    fn unindex(&mut self, subnet: Ipv4Net) -> Option<Entry> {
        let e = self.entries.remove(&subnet)?;
        if let Verdict::Candidate(p) = &e.verdict {
            let key = (e.lease.created, subnet);
            if let Some(set) = self.by_ip.get_mut(&e.lease.attrs.public_ip) {
                set.remove(&key);
                if set.is_empty() {
                    self.by_ip.remove(&e.lease.attrs.public_ip);
                }
            }
            if let Some(id) = Identity::of(p) {
                if let Some(set) = self.by_mac.get_mut(&id) {
                    set.remove(&key);
                    if set.is_empty() {
                        self.by_mac.remove(&id);
                    }
                }
            }
        }
        Some(e)
    }

    fn index(&mut self, lease: SubnetLease) {
        let verdict = self.judge(&lease);
        let subnet = lease.subnet;
        if let Verdict::Candidate(p) = &verdict {
            let key = (lease.created, subnet);
            self.by_ip.entry(lease.attrs.public_ip).or_default().insert(key);
            if let Some(id) = Identity::of(p) {
                self.by_mac.entry(id).or_default().insert(key);
            }
        }
        self.entries.insert(subnet, Entry { lease, verdict });
    }

    /// Applies store events; returns whether the set of peers changed (the route table must
    /// then be rebuilt). Logs every record whose verdict changed.
    pub fn apply(&mut self, events: &[LeaseEvent]) -> bool {
        // Every record whose acceptance may change, found in the state before the events: the
        // changed records, those sharing the old records' IP or MAC, and those sharing the new
        // records' (the groups they are about to join).
        let mut touched = BTreeSet::new();
        for ev in events {
            match ev {
                LeaseEvent::Added(l) => {
                    self.neighbourhood(l.subnet, &mut touched);
                    if let Some(set) = self.by_ip.get(&l.attrs.public_ip) {
                        touched.extend(set.iter().map(|(_, s)| *s));
                    }
                    if let Some(id) = candidate_identity(&self.judge(l)) {
                        if let Some(set) = self.by_mac.get(&id) {
                            touched.extend(set.iter().map(|(_, s)| *s));
                        }
                    }
                }
                LeaseEvent::Removed(s) => self.neighbourhood(*s, &mut touched),
            }
        }
        let before: BTreeMap<Ipv4Net, Result<Peer, Option<Refusal>>> =
            touched.iter().map(|s| (*s, self.accepted(*s).cloned())).collect();
        for ev in events {
            match ev {
                LeaseEvent::Added(l) => {
                    self.unindex(l.subnet);
                    self.index(l.clone());
                }
                LeaseEvent::Removed(s) => {
                    self.unindex(*s);
                }
            }
        }
        let mut changed = false;
        for s in &touched {
            let old = before.get(s).cloned().unwrap_or(Err(None));
            let new = self.accepted(*s).cloned();
            if old != new {
                changed |= old.is_ok() || new.is_ok();
                self.report(*s, &old, &new);
            }
        }
        changed
    }

    /// Replaces everything with `leases` (start-up, a re-list); returns whether the peers changed.
    pub fn replace_all(&mut self, leases: &[SubnetLease]) -> bool {
        let listed: BTreeSet<Ipv4Net> = leases.iter().map(|l| l.subnet).collect();
        let mut events: Vec<LeaseEvent> =
            self.entries.keys().filter(|s| !listed.contains(*s)).map(|s| LeaseEvent::Removed(*s)).collect();
        events.extend(
            leases
                .iter()
                .filter(|l| self.entries.get(&l.subnet).is_none_or(|e| e.lease != **l))
                .map(|l| LeaseEvent::Added(l.clone())),
        );
        self.apply(&events)
    }

    fn report(&mut self, subnet: Ipv4Net, old: &Result<Peer, Option<Refusal>>, new: &Result<Peer, Option<Refusal>>) {
        let ip = self.entries.get(&subnet).map(|e| e.lease.attrs.public_ip);
        match new {
            Ok(p) if old.is_err() => info!(peer = %p.name, endpoint = %p.endpoint, "peer added"),
            Ok(p) => info!(peer = %p.name, endpoint = %p.endpoint, "peer changed"),
            Err(why) => {
                if let Ok(p) = old {
                    info!(peer = %p.name, "peer removed");
                }
                if let Some(r) = why {
                    *self.refused_total.entry(*r).or_default() += 1;
                    warn!(subnet = %subnet, public_ip = ?ip, reason = r.as_str(), "lease record refused");
                }
            }
        }
    }

    /// The accepted peers, by subnet.
    pub fn peers(&self) -> Vec<Peer> {
        self.entries.keys().filter_map(|s| self.accepted(*s).ok().cloned()).collect()
    }

    /// Every record the store holds (ours included), for the lease cache.
    pub fn leases(&self) -> impl Iterator<Item = &SubnetLease> {
        self.entries.values().map(|e| &e.lease)
    }

    /// How many records are known (ours included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no record is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The records refused right now, with why.
    pub fn refused(&self) -> Vec<RefusedLease> {
        self.entries
            .iter()
            .filter_map(|(s, e)| {
                self.accepted(*s).err().flatten().map(|r| RefusedLease {
                    subnet: s.to_string(),
                    public_ip: e.lease.attrs.public_ip.to_string(),
                    reason: r.as_str().into(),
                })
            })
            .collect()
    }

    /// Records refused since start, by reason label (every reason listed, zeros included).
    pub fn refused_total(&self) -> BTreeMap<String, u64> {
        Refusal::ALL.iter().map(|r| (r.as_str().to_owned(), self.refused_total.get(r).copied().unwrap_or(0))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_ipam::LeaseAttrs;

    fn rules(backend: &str, vni: Option<u32>) -> PeerRules {
        PeerRules {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet_len: 24,
            ours: "10.244.1.0/24".parse().unwrap(),
            public_ip: Ipv4Addr::new(198, 18, 0, 1),
            backend: backend.into(),
            vni,
            port: 8472,
            public_key: None,
        }
    }

    fn lease(subnet: &str, ip: [u8; 4], created: u64, backend: &str, data: serde_json::Value) -> SubnetLease {
        let mut attrs = LeaseAttrs::new(Ipv4Addr::from(ip), backend);
        attrs.backend_data = data;
        SubnetLease { subnet: subnet.parse().unwrap(), attrs, expiration: None, created: Revision(created) }
    }

    fn udp(subnet: &str, ip: [u8; 4], created: u64) -> SubnetLease {
        lease(subnet, ip, created, "udp", serde_json::Value::Null)
    }

    fn names(p: &LeasePeers) -> Vec<String> {
        p.peers().into_iter().map(|p| p.name).collect()
    }

    fn reasons(p: &LeasePeers) -> Vec<(String, String)> {
        p.refused().into_iter().map(|r| (r.subnet, r.reason)).collect()
    }

    #[test]
    fn each_bad_record_is_refused_with_its_reason() {
        let vx = |mac: &str| serde_json::json!({"VNI": 1, "VtepMAC": mac});
        let mut p = LeasePeers::new(rules("vxlan", Some(1)));
        let leases = [
            lease("10.244.1.0/24", [198, 18, 0, 1], 1, "vxlan", vx("02:00:00:00:00:01")), // ours
            lease("10.244.2.0/24", [198, 18, 0, 2], 2, "vxlan", vx("02:00:00:00:00:02")),
            lease("10.244.0.0/16", [198, 18, 0, 66], 3, "vxlan", vx("02:00:00:00:00:66")), // the wide capture
            lease("10.9.0.0/24", [198, 18, 0, 4], 4, "vxlan", vx("02:00:00:00:00:04")),
            lease("10.244.1.0/25", [198, 18, 0, 5], 5, "vxlan", vx("02:00:00:00:00:05")),
            lease("10.244.6.0/24", [0, 0, 0, 0], 6, "vxlan", vx("02:00:00:00:00:06")),
            lease("10.244.7.0/24", [224, 0, 0, 7], 7, "vxlan", vx("02:00:00:00:00:07")),
            lease("10.244.8.0/24", [127, 0, 0, 8], 8, "vxlan", vx("02:00:00:00:00:08")),
            lease("10.244.9.0/24", [198, 18, 0, 9], 9, "udp", serde_json::Value::Null),
            lease(
                "10.244.10.0/24",
                [198, 18, 0, 10],
                10,
                "vxlan",
                serde_json::json!({"VNI": 2, "VtepMAC": "02:00:00:00:00:0a"}),
            ),
            lease("10.244.11.0/24", [198, 18, 0, 11], 11, "vxlan", vx("01:00:5e:00:00:0b")),
            lease("10.244.12.0/24", [198, 18, 0, 12], 12, "vxlan", serde_json::json!({"VNI": 1})),
            lease("10.244.13.0/24", [198, 18, 0, 1], 13, "vxlan", vx("02:00:00:00:00:01")), // our stale record
        ];
        assert!(p.replace_all(&leases));
        assert_eq!(names(&p), ["10.244.2.0-24"]);
        let got = reasons(&p);
        let want = [
            ("10.244.0.0/16", "wrong_subnet_len"),
            ("10.244.1.0/25", "wrong_subnet_len"),
            ("10.244.6.0/24", "bad_public_ip"),
            ("10.244.7.0/24", "bad_public_ip"),
            ("10.244.8.0/24", "bad_public_ip"),
            ("10.244.9.0/24", "other_backend"),
            ("10.244.10.0/24", "bad_backend_data"),
            ("10.244.11.0/24", "bad_backend_data"),
            ("10.244.12.0/24", "bad_backend_data"),
            ("10.9.0.0/24", "outside_network"),
        ];
        let want: Vec<(String, String)> = want.iter().map(|(a, b)| ((*a).into(), (*b).into())).collect();
        let mut got_sorted = got.clone();
        got_sorted.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(got_sorted, want_sorted);
        let totals = p.refused_total();
        assert_eq!(totals["wrong_subnet_len"], 2);
        assert_eq!(totals["bad_public_ip"], 3);
        assert_eq!(totals.values().sum::<u64>(), 10);
        assert_eq!(p.len(), leases.len());
        // Seeing the same records again counts nothing new.
        assert!(!p.replace_all(&leases));
        assert_eq!(p.refused_total().values().sum::<u64>(), 10);
    }

    /// WireGuard records must carry a PublicKey of their own: missing, malformed or ours is
    /// bad data, and a key an older record holds is a duplicate (a later record cannot take a
    /// peer's identity); when the older one goes, the next in line takes its place.
    #[test]
    fn wireguard_records_need_a_key_of_their_own() {
        use weft_forwarder::wireguard::PrivateKey;
        let ours = PrivateKey::generate().unwrap().public_key();
        let (k2, k3) = (PrivateKey::generate().unwrap().public_key(), PrivateKey::generate().unwrap().public_key());
        let mut p = LeasePeers::new(PeerRules { public_key: Some(ours), port: 51820, ..rules("wireguard", None) });
        let wg = |k: &PublicKey| serde_json::json!({"PublicKey": k.to_string()});
        let leases = [
            lease("10.244.2.0/24", [198, 18, 0, 2], 2, "wireguard", wg(&k2)),
            lease("10.244.3.0/24", [198, 18, 0, 3], 3, "wireguard", wg(&ours)),
            lease("10.244.4.0/24", [198, 18, 0, 4], 4, "wireguard", serde_json::json!({"PublicKey": "abc"})),
            lease("10.244.5.0/24", [198, 18, 0, 5], 5, "wireguard", serde_json::Value::Null),
            lease("10.244.6.0/24", [198, 18, 0, 6], 6, "wireguard", wg(&k2)),
            lease("10.244.7.0/24", [198, 18, 0, 7], 7, "wireguard", wg(&k3)),
        ];
        assert!(p.replace_all(&leases));
        assert_eq!(names(&p), ["10.244.2.0-24", "10.244.7.0-24"]);
        let mut got = reasons(&p);
        got.sort();
        let want: Vec<(String, String)> = [
            ("10.244.3.0/24", "bad_backend_data"),
            ("10.244.4.0/24", "bad_backend_data"),
            ("10.244.5.0/24", "bad_backend_data"),
            ("10.244.6.0/24", "duplicate_key"),
        ]
        .iter()
        .map(|(a, b)| ((*a).into(), (*b).into()))
        .collect();
        assert_eq!(got, want);
        let peer = p.peers().into_iter().find(|q| q.subnet.to_string() == "10.244.2.0/24").unwrap();
        assert_eq!((peer.public_key, peer.endpoint.port()), (Some(k2), 51820));
        // The older holder of k2 leaves: the later record takes its place.
        assert!(p.apply(&[LeaseEvent::Removed("10.244.2.0/24".parse().unwrap())]));
        assert_eq!(names(&p), ["10.244.6.0-24", "10.244.7.0-24"]);
    }

    #[test]
    fn someone_elses_record_for_our_subnet_is_refused() {
        let mut p = LeasePeers::new(rules("udp", None));
        p.replace_all(&[udp("10.244.1.0/24", [198, 18, 0, 9], 1)]);
        assert!(p.peers().is_empty());
        assert_eq!(reasons(&p), [("10.244.1.0/24".into(), "overlaps_ours".into())]);
    }

    #[test]
    fn duplicates_resolve_by_creation_revision_not_address() {
        let mut p = LeasePeers::new(rules("udp", None));
        // The later record has the lower address: it must not win.
        p.replace_all(&[udp("10.244.5.0/24", [198, 18, 0, 2], 10)]);
        assert!(!p.apply(&[]));
        let changed = p.apply(&[LeaseEvent::Added(udp("10.244.3.0/24", [198, 18, 0, 2], 20))]);
        assert!(!changed, "a younger duplicate changes nothing");
        assert_eq!(names(&p), ["10.244.5.0-24"]);
        assert_eq!(reasons(&p), [("10.244.3.0/24".into(), "duplicate_endpoint".into())]);
        // The older one goes: the next in line takes over.
        assert!(p.apply(&[LeaseEvent::Removed("10.244.5.0/24".parse().unwrap())]));
        assert_eq!(names(&p), ["10.244.3.0-24"]);
        assert!(p.refused().is_empty());
    }

    #[test]
    fn an_older_record_arriving_later_displaces_the_younger() {
        let mut p = LeasePeers::new(rules("udp", None));
        p.replace_all(&[udp("10.244.3.0/24", [198, 18, 0, 2], 20)]);
        assert_eq!(names(&p), ["10.244.3.0-24"]);
        // A re-list finds an older record with the same PublicIP (say, after a partition).
        assert!(p.apply(&[LeaseEvent::Added(udp("10.244.5.0/24", [198, 18, 0, 2], 10))]));
        assert_eq!(names(&p), ["10.244.5.0-24"]);
        assert_eq!(reasons(&p), [("10.244.3.0/24".into(), "duplicate_endpoint".into())]);
    }

    #[test]
    fn duplicate_vtep_macs_resolve_by_age() {
        let vx = |mac: &str| serde_json::json!({"VNI": 1, "VtepMAC": mac});
        let mut p = LeasePeers::new(rules("vxlan", Some(1)));
        p.replace_all(&[
            lease("10.244.2.0/24", [198, 18, 0, 2], 5, "vxlan", vx("02:00:00:00:00:22")),
            lease("10.244.3.0/24", [198, 18, 0, 3], 4, "vxlan", vx("02:00:00:00:00:22")),
        ]);
        assert_eq!(names(&p), ["10.244.3.0-24"]);
        assert_eq!(reasons(&p), [("10.244.2.0/24".into(), "duplicate_mac".into())]);
    }

    #[test]
    fn changes_are_reported_and_unchanged_records_are_not() {
        let mut p = LeasePeers::new(rules("udp", None));
        assert!(p.apply(&[LeaseEvent::Added(udp("10.244.2.0/24", [198, 18, 0, 2], 1))]));
        // The same record again (a renewal with the same attributes) changes nothing.
        assert!(!p.apply(&[LeaseEvent::Added(udp("10.244.2.0/24", [198, 18, 0, 2], 1))]));
        // A moved endpoint is a change.
        assert!(p.apply(&[LeaseEvent::Added(udp("10.244.2.0/24", [198, 18, 0, 22], 1))]));
        assert_eq!(p.peers()[0].endpoint, "198.18.0.22:8472".parse().unwrap());
        // A record going bad drops the peer and counts.
        assert!(p.apply(&[LeaseEvent::Added(udp("10.244.2.0/24", [0, 0, 0, 0], 1))]));
        assert!(p.peers().is_empty());
        assert_eq!(p.refused_total()["bad_public_ip"], 1);
        assert!(!p.apply(&[LeaseEvent::Removed("10.244.2.0/24".parse().unwrap())]));
        assert!(p.is_empty());
    }

    #[test]
    fn twenty_thousand_records_then_one_event() {
        let mut p = LeasePeers::new(PeerRules {
            network: "10.0.0.0/8".parse().unwrap(),
            ours: "10.0.1.0/24".parse().unwrap(),
            ..rules("udp", None)
        });
        let leases: Vec<SubnetLease> = (0..20_000u32)
            .map(|i| {
                let net = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + ((i + 2) << 8)), 24).unwrap();
                let ip = Ipv4Addr::from(0xc612_0000 + i + 2);
                SubnetLease {
                    subnet: net,
                    attrs: LeaseAttrs::new(ip, "udp"),
                    expiration: None,
                    created: Revision(u64::from(i)),
                }
            })
            .collect();
        assert!(p.replace_all(&leases));
        assert_eq!(p.peers().len(), 20_000);
        // A re-list that finds everything gone but one costs no more than the first list.
        let mut q = LeasePeers::new(p.rules().clone());
        q.replace_all(&leases);
        assert!(q.replace_all(&leases[..1]));
        assert_eq!(q.peers().len(), 1);
        let one = SubnetLease { attrs: LeaseAttrs::new(Ipv4Addr::new(198, 19, 0, 1), "udp"), ..leases[7].clone() };
        assert!(p.apply(&[LeaseEvent::Added(one)]));
        assert_eq!(p.peers().len(), 20_000);
    }
}
