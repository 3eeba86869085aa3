//! The lease state machine: acquire, renew, re-acquire, and never overwrite another node.
//!
//! Sans-IO in quinn's style: [`LeaseKeeper::poll`] says what to do next ([`LeaseAction`]),
//! the caller does it against a [`crate::LeaseStore`] and hands the result back through an
//! `on_*` method. The keeper never reads the clock, sleeps or touches the store; `now` is an
//! argument and the jitter comes from a seeded RNG it owns. [`crate::lease_loop::execute`] is the
//! ready-made I/O step.
//!
//! 1. **Acquire** (flannel's `tryAcquireLease`, `pkg/subnet/etcd/local_manager.go`): list the
//!    leases, then (a) renew the lease whose `PublicIP` is ours if this config would still lease
//!    that subnet (otherwise release it); else (b) create the subnet from `subnet.env` if nobody
//!    holds it (flannel#1289: reusing it while another node held it gave two nodes one subnet);
//!    else (c) create a random one of the first 100 free subnets. Creation is create-if-absent;
//!    losing the race re-lists and tries again.
//! 2. **Hold**: renew `renew_margin` before expiry (24 h TTL, 1 h margin by default). A failed
//!    renewal is retried with jittered backoff capped at 30 s, forever: the data plane keeps its
//!    table meanwhile, and the node stays ready until its own expiration passes.
//! 3. **Lost** (the record vanished: it expired while we were cut off, or someone deleted it;
//!    seen as a renew answer or a watch event): re-create the *same* subnet, create-if-absent.
//!    The daemon never exits on revocation (flannel#904).
//! 4. **Conflict** (another node holds our subnet): never overwrite it. The node is not ready,
//!    keeps forwarding for existing pods, and keeps trying create-if-absent in case the other
//!    node leaves; [`LeaseKeeper::take_new_subnet`] moves on when the daemon or operator decides
//!    to.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, SystemTime};

use ipnet::Ipv4Net;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tracing::{error, info, warn};

use crate::backoff::Backoff;
use crate::lease::{LeaseAttrs, SubnetLease};
use crate::store::{LeaseSnapshot, Revision, StoreError};
use crate::subnet::SubnetRange;
use crate::watch::LeaseEvent;

/// After this many create races lost in a row, re-listing waits for the backoff instead of
/// going again at once (a pick among 100 free subnets rarely collides twice, but a full range
/// would otherwise spin).
const IMMEDIATE_RACE_RETRIES: u32 = 5;

/// What the keeper needs to know, fixed for its lifetime except `attrs` ([`LeaseKeeper::set_attrs`]).
#[derive(Clone, Debug)]
pub struct KeeperConfig {
    /// The subnets this network leases ([`crate::NetworkConfig::subnet_range`]).
    pub range: SubnetRange,
    /// What we publish: our `PublicIP` (also our identity on restart), backend type and data.
    pub attrs: LeaseAttrs,
    /// The subnet from `subnet.env`, if any ([`crate::SubnetEnv::read_previous_subnet`]).
    pub previous_subnet: Option<Ipv4Net>,
    /// Lease lifetime (flannel: 24 h).
    pub ttl: Duration,
    /// Renew this long before expiry (flannel: 1 h). Capped at half the TTL.
    pub renew_margin: Duration,
    /// First retry delay after a store error.
    pub retry_initial: Duration,
    /// Retry delay cap (never giving up).
    pub retry_max: Duration,
    /// Seed of the RNG behind the subnet pick and the retry jitter. Give each node a different
    /// one (e.g. from the OS); tests give a fixed one to replay a run.
    pub seed: u64,
}

impl KeeperConfig {
    /// flannel's lease TTL.
    pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
    /// flannel's `--subnet-lease-renew-margin`.
    pub const DEFAULT_RENEW_MARGIN: Duration = Duration::from_secs(3600);

    /// flannel's timing, weft's retry policy ([`Backoff::default`]), no previous subnet, seed 0.
    pub fn new(range: SubnetRange, attrs: LeaseAttrs) -> Self {
        Self {
            range,
            attrs,
            previous_subnet: None,
            ttl: Self::DEFAULT_TTL,
            renew_margin: Self::DEFAULT_RENEW_MARGIN,
            retry_initial: Backoff::DEFAULT_INITIAL,
            retry_max: Backoff::DEFAULT_MAX,
            seed: 0,
        }
    }
}

/// The next thing the lease loop should do.
#[derive(Clone, Debug, PartialEq)]
#[must_use]
pub enum LeaseAction {
    /// Call [`crate::LeaseStore::list`], then [`LeaseKeeper::on_listed`].
    List,
    /// Call [`crate::LeaseStore::create`] with [`LeaseKeeper::ttl`], then [`LeaseKeeper::on_created`].
    Create(SubnetLease),
    /// Call [`crate::LeaseStore::renew`] with [`LeaseKeeper::ttl`], then [`LeaseKeeper::on_renewed`].
    Renew(SubnetLease),
    /// Call [`crate::LeaseStore::release`], then [`LeaseKeeper::on_released`] (a lease of ours
    /// that the current config would not lease any more).
    Release(SubnetLease),
    /// Nothing to do before this time, unless a watch event arrives first
    /// ([`LeaseKeeper::on_lease_event`]).
    WaitUntil(SystemTime),
}

/// Something that happened to our lease, for the daemon to act on or log.
#[derive(Clone, Debug, PartialEq)]
pub enum KeeperEvent {
    /// We hold `lease`. Write `subnet.env`; if the subnet differs from before, reconfigure.
    Acquired {
        /// The lease as stored.
        lease: SubnetLease,
        /// Which step of the acquire order produced it.
        source: AcquireSource,
    },
    /// Our record vanished (expired while cut off, or deleted); re-creating the same subnet.
    Lost {
        /// Our subnet.
        subnet: Ipv4Net,
    },
    /// Another node holds our subnet. Not ready; an operator (or the daemon, when the node has
    /// no pods) should decide, then call [`LeaseKeeper::take_new_subnet`].
    Conflict {
        /// Our subnet.
        subnet: Ipv4Net,
        /// The other holder's `PublicIP`, when known.
        holder: Option<Ipv4Addr>,
    },
    /// The subnet from `subnet.env` is held by someone else, so a new one is picked
    /// (flannel#1289).
    PreviousSubnetTaken {
        /// The subnet.
        subnet: Ipv4Net,
        /// Its holder.
        holder: Option<Ipv4Addr>,
    },
    /// Our expiration passed without a successful renewal (store unreachable for longer than
    /// the margin). Not ready until the store answers.
    Expired {
        /// Our subnet.
        subnet: Ipv4Net,
    },
    /// Every subnet of the range is taken.
    NoFreeSubnet,
}

/// How a lease was obtained.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum AcquireSource {
    /// Our own lease (same `PublicIP`) was still in the store and was renewed.
    OwnLease,
    /// The subnet from `subnet.env` was free and was created again.
    PreviousSubnet,
    /// A free subnet was picked.
    NewSubnet,
    /// Our lost lease was re-created.
    Recreated,
}

/// A coarse phase, for `weft status` and metrics.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum KeeperPhase {
    /// No lease yet.
    Acquiring,
    /// Holding a lease.
    Held,
    /// Holding a lease whose expiration passed without a successful renewal.
    Expired,
    /// Re-creating a lease that vanished.
    Lost,
    /// Another node holds our subnet.
    Conflict,
    /// Released on graceful leave.
    Released,
}

/// A snapshot of the keeper for status output and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct KeeperStatus {
    /// The phase.
    pub phase: KeeperPhase,
    /// The subnet in use (kept through Lost and Conflict: existing pods still use it).
    pub subnet: Option<Ipv4Net>,
    /// Our lease's expiration (`None` before acquiring, or for a reservation).
    pub expiration: Option<SystemTime>,
    /// Whether CNI ADD may hand out addresses: a lease is held and not past its expiration.
    pub ready: bool,
    /// Store failures in a row.
    pub failures: u32,
    /// The last store error, if the last operation failed.
    pub last_error: Option<String>,
}

#[derive(Clone, Debug)]
enum Step {
    NeedList,
    Refresh(SubnetLease),
    ReleaseStale { stale: SubnetLease, snapshot: LeaseSnapshot },
    Create { lease: SubnetLease, source: AcquireSource },
}

#[derive(Clone, Debug)]
enum State {
    Acquiring { step: Step, retry_at: SystemTime },
    Held { lease: SubnetLease, next_renew: SystemTime, expired_reported: bool },
    Lost { lease: SubnetLease, retry_at: SystemTime },
    Conflict { lease: SubnetLease, retry_at: SystemTime },
    Released,
}

/// The lease state machine (see the module docs).
#[derive(Debug)]
pub struct LeaseKeeper {
    config: KeeperConfig,
    state: State,
    backoff: Backoff,
    rng: StdRng,
    events: VecDeque<KeeperEvent>,
    races: u32,
    last_error: Option<String>,
    /// Subnet to prefer when acquiring: `subnet.env`'s, then whatever we last held.
    previous_subnet: Option<Ipv4Net>,
    /// Subnet never to pick again (the one we gave up after a conflict).
    avoid: Option<Ipv4Net>,
}

fn add(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d).unwrap_or(t)
}

fn sub(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH)
}

impl LeaseKeeper {
    /// A keeper that will start by acquiring.
    pub fn new(config: KeeperConfig) -> Self {
        let backoff = Backoff::new(config.retry_initial, config.retry_max);
        let rng = StdRng::seed_from_u64(config.seed);
        let previous_subnet = config.previous_subnet;
        Self {
            config,
            state: State::Acquiring { step: Step::NeedList, retry_at: SystemTime::UNIX_EPOCH },
            backoff,
            rng,
            events: VecDeque::new(),
            races: 0,
            last_error: None,
            previous_subnet,
            avoid: None,
        }
    }

    /// The TTL to pass to `create` and `renew`.
    pub fn ttl(&self) -> Duration {
        self.config.ttl
    }

    /// The attributes we publish.
    pub fn attrs(&self) -> &LeaseAttrs {
        &self.config.attrs
    }

    fn margin(&self) -> Duration {
        self.config.renew_margin.min(self.config.ttl / 2)
    }

    fn ours(&self, subnet: Ipv4Net, expiration: Option<SystemTime>) -> SubnetLease {
        SubnetLease { subnet, attrs: self.config.attrs.clone(), expiration, created: Revision(0) }
    }

    /// What to do next at `now`.
    pub fn poll(&mut self, now: SystemTime) -> LeaseAction {
        let at = |t: SystemTime, action: LeaseAction| if now >= t { action } else { LeaseAction::WaitUntil(t) };
        match &mut self.state {
            State::Acquiring { step, retry_at } => {
                let action = match step {
                    Step::NeedList => LeaseAction::List,
                    Step::Refresh(lease) => LeaseAction::Renew(lease.clone()),
                    Step::ReleaseStale { stale, .. } => LeaseAction::Release(stale.clone()),
                    Step::Create { lease, .. } => LeaseAction::Create(lease.clone()),
                };
                at(*retry_at, action)
            }
            State::Held { lease, next_renew, expired_reported } => {
                if lease.is_expired(now) && !*expired_reported {
                    *expired_reported = true;
                    warn!(subnet = %lease.subnet, "lease expired without renewal; not ready until the store answers");
                    self.events.push_back(KeeperEvent::Expired { subnet: lease.subnet });
                }
                let renew = SubnetLease {
                    subnet: lease.subnet,
                    attrs: self.config.attrs.clone(),
                    expiration: lease.expiration,
                    created: lease.created,
                };
                match at(*next_renew, LeaseAction::Renew(renew)) {
                    // Wake at the expiration too, so `Expired` is reported on time.
                    LeaseAction::WaitUntil(t) if !*expired_reported => {
                        LeaseAction::WaitUntil(lease.expiration.map_or(t, |exp| t.min(exp)))
                    }
                    action => action,
                }
            }
            State::Lost { lease, retry_at } | State::Conflict { lease, retry_at } => {
                let create = SubnetLease {
                    subnet: lease.subnet,
                    attrs: self.config.attrs.clone(),
                    expiration: None,
                    created: Revision(0),
                };
                at(*retry_at, LeaseAction::Create(create))
            }
            State::Released => LeaseAction::WaitUntil(add(now, self.config.ttl)),
        }
    }

    /// The next event for the daemon, oldest first.
    pub fn poll_event(&mut self) -> Option<KeeperEvent> {
        self.events.pop_front()
    }

    fn retry_delay(&mut self, err: &StoreError) -> Duration {
        self.last_error = Some(err.to_string());
        self.backoff.next_delay(&mut self.rng)
    }

    fn become_held(&mut self, lease: SubnetLease, source: AcquireSource, now: SystemTime) {
        info!(
            subnet = %lease.subnet,
            public_ip = %lease.attrs.public_ip,
            ttl_secs = self.config.ttl.as_secs(),
            source = ?source,
            "lease acquired"
        );
        self.backoff.reset();
        self.races = 0;
        self.last_error = None;
        self.previous_subnet = Some(lease.subnet);
        let next_renew = self.renew_time(&lease, now);
        self.events.push_back(KeeperEvent::Acquired { lease: lease.clone(), source });
        self.state = State::Held { lease, next_renew, expired_reported: false };
    }

    fn renew_time(&self, lease: &SubnetLease, now: SystemTime) -> SystemTime {
        match lease.expiration {
            Some(exp) => sub(exp, self.margin()).max(now),
            // A reservation never expires; re-publish our attributes once per TTL anyway.
            None => add(now, self.config.ttl - self.margin()),
        }
    }

    fn acquire_again(&mut self, retry_at: SystemTime) {
        self.state = State::Acquiring { step: Step::NeedList, retry_at };
    }

    /// Result of [`LeaseAction::List`].
    pub fn on_listed(&mut self, result: Result<LeaseSnapshot, StoreError>, now: SystemTime) {
        let State::Acquiring { step: Step::NeedList, .. } = self.state else { return };
        let snapshot = match result {
            Ok(s) => s,
            Err(e) => {
                let delay = self.retry_delay(&e);
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "listing leases failed");
                return self.acquire_again(add(now, delay));
            }
        };
        let own = snapshot.find_by_public_ip(self.config.attrs.public_ip).cloned();
        match own {
            Some(own) if self.config.range.contains(own.subnet) && Some(own.subnet) != self.avoid => {
                info!(subnet = %own.subnet, "found a lease for our public ip, reusing it");
                self.previous_subnet = Some(own.subnet);
                let refresh = self.ours(own.subnet, own.expiration);
                self.state = State::Acquiring { step: Step::Refresh(refresh), retry_at: now };
            }
            Some(own) if !self.config.range.contains(own.subnet) => {
                info!(subnet = %own.subnet, "our old lease does not fit the network config, releasing it");
                self.state = State::Acquiring { step: Step::ReleaseStale { stale: own, snapshot }, retry_at: now };
            }
            _ => self.choose_fresh(&snapshot, now),
        }
    }

    /// Steps (b) and (c) of the acquire order.
    fn choose_fresh(&mut self, snapshot: &LeaseSnapshot, now: SystemTime) {
        if let Some(prev) = self.previous_subnet.filter(|p| self.config.range.contains(*p) && Some(*p) != self.avoid) {
            let taken_unreadable = snapshot.unreadable.iter().any(|u| u.subnet == Some(prev));
            match snapshot.holder_of(prev) {
                None if !taken_unreadable => {
                    let lease = self.ours(prev, None);
                    let source = AcquireSource::PreviousSubnet;
                    self.state = State::Acquiring { step: Step::Create { lease, source }, retry_at: now };
                    return;
                }
                holder => {
                    let holder = holder.map(|h| h.attrs.public_ip);
                    warn!(subnet = %prev, holder = ?holder, "our previous subnet is held by another node, picking a new one");
                    self.events.push_back(KeeperEvent::PreviousSubnetTaken { subnet: prev, holder });
                    self.previous_subnet = None;
                }
            }
        }
        let taken = snapshot.taken().chain(self.avoid);
        match self.config.range.pick_free(taken, &mut self.rng) {
            Some(subnet) => {
                let lease = self.ours(subnet, None);
                let source = AcquireSource::NewSubnet;
                self.state = State::Acquiring { step: Step::Create { lease, source }, retry_at: now };
            }
            None => {
                let delay = self.backoff.next_delay(&mut self.rng);
                self.last_error = Some("no free subnet".into());
                error!(range = %self.config.range.network(), "no free subnet left in the network");
                self.events.push_back(KeeperEvent::NoFreeSubnet);
                self.acquire_again(add(now, delay));
            }
        }
    }

    /// Result of [`LeaseAction::Create`].
    pub fn on_created(&mut self, result: Result<Option<SubnetLease>, StoreError>, now: SystemTime) {
        match (&self.state, result) {
            (State::Acquiring { step: Step::Create { source, .. }, .. }, Ok(Some(lease))) => {
                let source = *source;
                self.become_held(lease, source, now);
            }
            (State::Acquiring { step: Step::Create { lease, .. }, .. }, Ok(None)) => {
                self.races += 1;
                info!(subnet = %lease.subnet, "another node created this subnet first, retrying");
                let retry_at = if self.races < IMMEDIATE_RACE_RETRIES {
                    now
                } else {
                    add(now, self.backoff.next_delay(&mut self.rng))
                };
                self.acquire_again(retry_at);
            }
            (State::Acquiring { step: Step::Create { .. }, .. }, Err(e)) => {
                let delay = self.retry_delay(&e);
                warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "creating a lease failed");
                self.acquire_again(add(now, delay));
            }
            (State::Lost { .. } | State::Conflict { .. }, Ok(Some(lease))) => {
                self.become_held(lease, AcquireSource::Recreated, now);
            }
            (State::Lost { lease, .. }, Ok(None)) => {
                let lease = lease.clone();
                self.enter_conflict(lease, None, now);
            }
            (State::Conflict { lease, .. }, Ok(None)) => {
                let lease = lease.clone();
                let retry_at = add(now, self.backoff.next_delay(&mut self.rng));
                self.state = State::Conflict { lease, retry_at };
            }
            (State::Lost { lease, .. } | State::Conflict { lease, .. }, Err(e)) => {
                let lease = lease.clone();
                let lost = matches!(self.state, State::Lost { .. });
                let retry_at = add(now, self.retry_delay(&e));
                warn!(subnet = %lease.subnet, error = %e, "re-creating our lease failed");
                self.state = if lost { State::Lost { lease, retry_at } } else { State::Conflict { lease, retry_at } };
            }
            _ => {}
        }
    }

    fn enter_conflict(&mut self, lease: SubnetLease, holder: Option<Ipv4Addr>, now: SystemTime) {
        error!(
            subnet = %lease.subnet,
            holder = ?holder,
            "another node holds our subnet; not overwriting it. Not ready: move this node to a new subnet \
             (when it has no pods) or remove the other lease"
        );
        self.events.push_back(KeeperEvent::Conflict { subnet: lease.subnet, holder });
        self.backoff.reset();
        let retry_at = add(now, self.backoff.next_delay(&mut self.rng));
        self.state = State::Conflict { lease, retry_at };
    }

    fn enter_lost(&mut self, lease: SubnetLease, now: SystemTime) {
        warn!(subnet = %lease.subnet, "our lease is gone from the store, re-creating the same subnet");
        self.events.push_back(KeeperEvent::Lost { subnet: lease.subnet });
        self.state = State::Lost { lease, retry_at: now };
    }

    /// Result of [`LeaseAction::Renew`].
    pub fn on_renewed(&mut self, result: Result<SubnetLease, StoreError>, now: SystemTime) {
        match (&self.state, result) {
            (State::Acquiring { step: Step::Refresh(_), .. }, Ok(lease)) => {
                self.become_held(lease, AcquireSource::OwnLease, now);
            }
            (State::Acquiring { step: Step::Refresh(_), .. }, Err(e)) => {
                // Gone: it expired since the list; the next list will not find it by PublicIP,
                // and previous_subnet makes us re-create it. Taken: someone got it in between;
                // the next list shows who. Anything else: back off.
                let retry_at = match e {
                    StoreError::LeaseGone { .. } => now,
                    StoreError::LeaseTaken { .. } => {
                        self.previous_subnet = None;
                        now
                    }
                    _ => add(now, self.retry_delay(&e)),
                };
                self.acquire_again(retry_at);
            }
            (State::Held { .. }, Ok(renewed)) => {
                let next_renew = self.renew_time(&renewed, now);
                self.state = State::Held { lease: renewed, next_renew, expired_reported: false };
                self.backoff.reset();
                self.last_error = None;
            }
            (State::Held { lease, .. }, Err(StoreError::LeaseGone { .. })) => {
                let lease = lease.clone();
                self.enter_lost(lease, now);
            }
            (State::Held { lease, .. }, Err(StoreError::LeaseTaken { holder, .. })) => {
                let lease = lease.clone();
                self.enter_conflict(lease, Some(holder), now);
            }
            (State::Held { lease, expired_reported, .. }, Err(e)) => {
                let (lease, expired_reported) = (lease.clone(), *expired_reported);
                let delay = self.retry_delay(&e);
                warn!(
                    subnet = %lease.subnet,
                    error = %e,
                    failures = self.backoff.failures(),
                    retry_in_ms = delay.as_millis() as u64,
                    "lease renewal failed"
                );
                self.state = State::Held { lease, next_renew: add(now, delay), expired_reported };
            }
            _ => {}
        }
    }

    /// Result of [`LeaseAction::Release`] (releasing a stale lease of ours while acquiring).
    pub fn on_released(&mut self, result: Result<bool, StoreError>, now: SystemTime) {
        let State::Acquiring { step: Step::ReleaseStale { stale, snapshot }, .. } = &self.state else { return };
        if let Err(e) = &result {
            // Not fatal: the stale lease expires by itself.
            warn!(subnet = %stale.subnet, error = %e, "releasing our stale lease failed");
        }
        let mut snapshot = snapshot.clone();
        let stale = stale.subnet;
        snapshot.leases.retain(|l| l.subnet != stale);
        self.choose_fresh(&snapshot, now);
    }

    /// A watch event. Detects revocation within one event: our subnet removed (re-create it) or
    /// taken by another `PublicIP` (conflict).
    pub fn on_lease_event(&mut self, event: &LeaseEvent, now: SystemTime) {
        let ours = self.config.attrs.public_ip;
        match (&self.state, event) {
            (State::Held { lease, .. }, LeaseEvent::Removed(subnet)) if *subnet == lease.subnet => {
                let lease = lease.clone();
                self.enter_lost(lease, now);
            }
            (State::Held { lease, .. } | State::Lost { lease, .. }, LeaseEvent::Added(other))
                if other.subnet == lease.subnet && other.attrs.public_ip != ours =>
            {
                let lease = lease.clone();
                self.enter_conflict(lease, Some(other.attrs.public_ip), now);
            }
            (State::Conflict { lease, .. }, LeaseEvent::Removed(subnet)) if *subnet == lease.subnet => {
                // The other holder left: try to take our subnet back right away.
                let lease = lease.clone();
                self.state = State::Conflict { lease, retry_at: now };
            }
            _ => {}
        }
    }

    /// Gives up the subnet we are in conflict over (or lost) and acquires a new one, never that
    /// one. The daemon calls this when the node has no pods, or when the operator says so.
    /// Returns `false` (and does nothing) in other phases.
    pub fn take_new_subnet(&mut self, now: SystemTime) -> bool {
        let (State::Conflict { lease, .. } | State::Lost { lease, .. }) = &self.state else { return false };
        info!(subnet = %lease.subnet, "giving up our subnet, acquiring a new one");
        self.avoid = Some(lease.subnet);
        self.previous_subnet = None;
        self.backoff.reset();
        self.acquire_again(now);
        true
    }

    /// Changes the attributes we publish (e.g. a new VtepMAC) and renews at once to publish them.
    pub fn set_attrs(&mut self, attrs: LeaseAttrs) {
        self.config.attrs = attrs;
        if let State::Held { next_renew, .. } = &mut self.state {
            *next_renew = SystemTime::UNIX_EPOCH;
        }
    }

    /// Stops keeping the lease (graceful leave) and returns the lease to pass to
    /// [`crate::LeaseStore::release`], if we hold one. Afterwards `poll` only waits.
    pub fn release(&mut self) -> Option<SubnetLease> {
        let lease = match &self.state {
            State::Held { lease, .. } => Some(self.ours(lease.subnet, lease.expiration)),
            _ => None,
        };
        self.state = State::Released;
        lease
    }

    /// The lease this node uses: held, or being recovered (Lost, Conflict), so existing pods keep
    /// their addresses and the data plane keeps forwarding.
    pub fn lease(&self) -> Option<&SubnetLease> {
        match &self.state {
            State::Held { lease, .. } | State::Lost { lease, .. } | State::Conflict { lease, .. } => Some(lease),
            State::Acquiring { .. } | State::Released => None,
        }
    }

    /// Whether new pods may get addresses: a lease is held and, by our clock, not expired.
    pub fn is_ready(&self, now: SystemTime) -> bool {
        matches!(&self.state, State::Held { lease, .. } if !lease.is_expired(now))
    }

    /// Status for `weft status` and metrics.
    pub fn status(&self, now: SystemTime) -> KeeperStatus {
        let phase = match &self.state {
            State::Acquiring { .. } => KeeperPhase::Acquiring,
            State::Held { lease, .. } if lease.is_expired(now) => KeeperPhase::Expired,
            State::Held { .. } => KeeperPhase::Held,
            State::Lost { .. } => KeeperPhase::Lost,
            State::Conflict { .. } => KeeperPhase::Conflict,
            State::Released => KeeperPhase::Released,
        };
        let lease = self.lease();
        KeeperStatus {
            phase,
            subnet: lease.map(|l| l.subnet),
            expiration: lease.and_then(|l| l.expiration),
            ready: self.is_ready(now),
            failures: self.backoff.failures(),
            last_error: self.last_error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NetworkConfig;
    use crate::lease_loop::execute;
    use crate::store::{LeaseStore, MemStore};
    use futures::executor::block_on;
    use rand::Rng;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    const SEC: Duration = Duration::from_secs(1);
    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    /// A fake clock shared by the test and the MemStore.
    #[derive(Clone)]
    struct Clock(Arc<AtomicU64>);

    impl Clock {
        fn new() -> Self {
            Self(Arc::new(AtomicU64::new(0)))
        }
        fn now(&self) -> SystemTime {
            t0() + Duration::from_millis(self.0.load(Ordering::SeqCst))
        }
        fn set(&self, t: SystemTime) {
            let ms = t.duration_since(t0()).unwrap().as_millis() as u64;
            self.0.fetch_max(ms, Ordering::SeqCst);
        }
        fn store(&self) -> MemStore {
            let c = self.clone();
            MemStore::with_clock(move || c.now())
        }
    }

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    fn cfg(network: &str, host: u8, ttl: Duration, margin: Duration) -> KeeperConfig {
        let range = NetworkConfig::from_json(network).unwrap().subnet_range();
        let attrs = LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, host), "udp");
        KeeperConfig { ttl, renew_margin: margin, seed: u64::from(host), ..KeeperConfig::new(range, attrs) }
    }

    fn cfg10(host: u8) -> KeeperConfig {
        cfg(r#"{"Network":"10.244.0.0/16"}"#, host, 10 * SEC, 3 * SEC)
    }

    fn unreachable() -> StoreError {
        StoreError::Unavailable { reason: "partitioned".into() }
    }

    /// Runs actions until the keeper waits; returns when it wants to be woken. A cut-off node
    /// gets "unavailable" for everything.
    fn drive(k: &mut LeaseKeeper, store: &MemStore, cut_off: bool, now: SystemTime) -> SystemTime {
        for _ in 0..100 {
            match k.poll(now) {
                LeaseAction::WaitUntil(t) => return t,
                LeaseAction::List if cut_off => k.on_listed(Err(unreachable()), now),
                LeaseAction::Create(_) if cut_off => k.on_created(Err(unreachable()), now),
                LeaseAction::Renew(_) if cut_off => k.on_renewed(Err(unreachable()), now),
                LeaseAction::Release(_) if cut_off => k.on_released(Err(unreachable()), now),
                action => block_on(execute(k, store, action, || now)),
            }
        }
        panic!("keeper did not settle: {:?}", k.status(now));
    }

    fn events(k: &mut LeaseKeeper) -> Vec<KeeperEvent> {
        std::iter::from_fn(|| k.poll_event()).collect()
    }

    fn acquired(k: &mut LeaseKeeper) -> (SubnetLease, AcquireSource) {
        let evs = events(k);
        evs.iter()
            .find_map(|e| match e {
                KeeperEvent::Acquired { lease, source } => Some((lease.clone(), *source)),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no Acquired event in {evs:?}"))
    }

    #[test]
    fn acquires_then_renews_at_the_margin() {
        let clock = Clock::new();
        let store = clock.store();
        let mut k = LeaseKeeper::new(cfg10(1));
        assert_eq!(k.poll(t0()), LeaseAction::List);
        assert!(!k.is_ready(t0()));
        let wake = drive(&mut k, &store, false, t0());
        let (lease, source) = acquired(&mut k);
        assert_eq!(source, AcquireSource::NewSubnet);
        assert_eq!(lease.expiration, Some(t0() + 10 * SEC));
        assert_eq!(wake, t0() + 7 * SEC, "renew margin 3 s before a 10 s TTL");
        assert!(k.is_ready(t0()));
        assert!(matches!(k.poll(t0() + 7 * SEC), LeaseAction::Renew(l) if l.subnet == lease.subnet));
        clock.set(t0() + 7 * SEC);
        let wake = drive(&mut k, &store, false, t0() + 7 * SEC);
        assert_eq!(wake, t0() + 14 * SEC);
        assert_eq!(k.status(t0() + 7 * SEC).expiration, Some(t0() + 17 * SEC));
        assert_eq!(block_on(store.list()).unwrap().leases.len(), 1);
    }

    /// With the store reachable the lease never lapses (10⁵ simulated hours, 24 h TTL).
    #[test]
    fn never_expires_while_the_store_answers() {
        let clock = Clock::new();
        let store = clock.store();
        let mut k = LeaseKeeper::new(cfg(r#"{"Network":"10.244.0.0/16"}"#, 1, DAY, HOUR));
        let end = t0() + 100_000 * HOUR;
        let mut now = t0();
        let mut renewals = 0u32;
        while now < end {
            clock.set(now);
            let wake = drive(&mut k, &store, false, now);
            assert!(k.is_ready(now), "not ready at {:?}", now.duration_since(t0()));
            assert!(wake > now);
            now = wake;
            renewals += 1;
        }
        assert!(events(&mut k).iter().all(|e| matches!(e, KeeperEvent::Acquired { .. })));
        assert_eq!(events(&mut k).len(), 0);
        assert!((4300..4400).contains(&renewals), "{renewals} renewals");
    }

    /// etcd down for 2 h across the renewal point and past the expiry: retries every ≤ 30 s,
    /// no exit, not ready once expired, same subnet afterwards.
    #[test]
    fn store_down_for_two_hours_then_back() {
        let clock = Clock::new();
        let store = clock.store();
        let mut k = LeaseKeeper::new(cfg(r#"{"Network":"10.244.0.0/16"}"#, 1, DAY, HOUR));
        drive(&mut k, &store, false, t0());
        let (lease, _) = acquired(&mut k);
        let down_from = t0() + 23 * HOUR;
        let down_until = down_from + 2 * HOUR;
        let mut now = down_from;
        let mut attempts = 0u32;
        let mut gaps = Vec::new();
        let mut woke_at_expiry = false;
        while now < down_until {
            clock.set(now);
            store.set_available(false);
            let wake = drive(&mut k, &store, false, now);
            gaps.push(wake.duration_since(now).unwrap());
            attempts += 1;
            assert_eq!(k.is_ready(now), now < t0() + DAY, "ready only until our own expiration");
            woke_at_expiry |= now == t0() + DAY;
            now = wake;
        }
        assert!(gaps.iter().all(|g| *g <= 30 * SEC), "gaps {gaps:?}");
        // Only the wake-up at our own expiration may come sooner than the backoff floor.
        assert!(gaps.iter().filter(|g| **g < SEC / 2).count() <= 1, "gaps {gaps:?}");
        assert!(woke_at_expiry, "the keeper wakes at its expiration to report it");
        assert!(gaps[gaps.len() - 100..].iter().all(|g| *g >= 15 * SEC), "jittered cap is [15 s, 30 s]");
        assert!((240..600).contains(&attempts), "{attempts} attempts in 2 h");
        assert!(events(&mut k).contains(&KeeperEvent::Expired { subnet: lease.subnet }));
        assert_eq!(k.status(now).phase, KeeperPhase::Expired);
        assert_eq!(k.lease().map(|l| l.subnet), Some(lease.subnet), "the data plane keeps its subnet");
        // Back: the renewal finds the record gone and re-creates the same subnet.
        store.set_available(true);
        clock.set(now);
        drive(&mut k, &store, false, now);
        let evs = events(&mut k);
        assert!(evs.contains(&KeeperEvent::Lost { subnet: lease.subnet }), "{evs:?}");
        assert!(evs.iter().any(|e| matches!(e, KeeperEvent::Acquired { lease: l, source: AcquireSource::Recreated } if l.subnet == lease.subnet)));
        assert!(k.is_ready(now));
    }

    #[test]
    fn restart_reuses_the_lease_with_our_public_ip() {
        let clock = Clock::new();
        let store = clock.store();
        let mut first = LeaseKeeper::new(cfg10(1));
        drive(&mut first, &store, false, t0());
        let (lease, _) = acquired(&mut first);
        drop(first);
        let now = t0() + 5 * SEC;
        clock.set(now);
        let mut again = LeaseKeeper::new(KeeperConfig { seed: 99, ..cfg10(1) });
        drive(&mut again, &store, false, now);
        let (relet, source) = acquired(&mut again);
        assert_eq!((relet.subnet, source), (lease.subnet, AcquireSource::OwnLease));
        assert_eq!(relet.expiration, Some(now + 10 * SEC), "renewed, not just found");
    }

    #[test]
    fn restart_after_expiry_reuses_the_subnet_env_subnet() {
        let clock = Clock::new();
        let store = clock.store();
        let now = t0() + 60 * SEC;
        clock.set(now);
        let mut k = LeaseKeeper::new(KeeperConfig { previous_subnet: Some(net("10.244.77.0/24")), ..cfg10(1) });
        drive(&mut k, &store, false, now);
        let (lease, source) = acquired(&mut k);
        assert_eq!((lease.subnet, source), (net("10.244.77.0/24"), AcquireSource::PreviousSubnet));
    }

    #[test]
    fn subnet_env_subnet_outside_the_config_is_ignored() {
        let clock = Clock::new();
        let store = clock.store();
        let mut k = LeaseKeeper::new(KeeperConfig { previous_subnet: Some(net("10.99.1.0/24")), ..cfg10(1) });
        drive(&mut k, &store, false, t0());
        let (lease, source) = acquired(&mut k);
        assert_eq!(source, AcquireSource::NewSubnet);
        assert_ne!(lease.subnet, net("10.99.1.0/24"));
    }

    /// flannel#1289 at startup: subnet.env names a subnet someone else holds now.
    #[test]
    fn previous_subnet_held_by_another_node_is_not_reused() {
        let clock = Clock::new();
        let store = clock.store();
        let s = net("10.244.5.0/24");
        let mut b = LeaseKeeper::new(KeeperConfig { previous_subnet: Some(s), ..cfg10(2) });
        drive(&mut b, &store, false, t0());
        assert_eq!(acquired(&mut b).0.subnet, s);
        let mut a = LeaseKeeper::new(KeeperConfig { previous_subnet: Some(s), ..cfg10(1) });
        drive(&mut a, &store, false, t0());
        let evs = events(&mut a);
        assert!(
            evs.contains(&KeeperEvent::PreviousSubnetTaken { subnet: s, holder: Some(Ipv4Addr::new(198, 18, 0, 2)) })
        );
        assert_ne!(a.lease().unwrap().subnet, s);
        let holder = block_on(store.list()).unwrap().leases.into_iter().find(|l| l.subnet == s).unwrap();
        assert_eq!(holder.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 2));
    }

    /// flannel#1289 live: cut off past the TTL, the subnet is taken meanwhile; on return we
    /// never overwrite it, stay not-ready, and move only when told to.
    #[test]
    fn cut_off_past_ttl_and_taken_meanwhile_never_overwrites() {
        let clock = Clock::new();
        let store = clock.store();
        let mut a = LeaseKeeper::new(cfg10(1));
        drive(&mut a, &store, false, t0());
        let (lease, _) = acquired(&mut a);
        let s = lease.subnet;
        // A is partitioned from t0 + 7 s (its renewal point) for 30 s.
        let mut now = t0() + 7 * SEC;
        let heal = now + 30 * SEC;
        let mut b = LeaseKeeper::new(KeeperConfig { previous_subnet: Some(s), ..cfg10(2) });
        let mut b_has_it = false;
        while now < heal {
            clock.set(now);
            let wake = drive(&mut a, &store, true, now);
            if b_has_it {
                drive(&mut b, &store, false, now);
            } else if now >= t0() + 11 * SEC {
                store.tick();
                drive(&mut b, &store, false, now);
                assert_eq!(acquired(&mut b).0.subnet, s, "B takes the expired subnet");
                b_has_it = true;
            }
            assert!(!(a.is_ready(now) && b.is_ready(now)), "two ready holders of {s} at {now:?}");
            now = wake.min(now + SEC);
        }
        // Healed. A learns that B holds it and does not write.
        let mut creates = 0;
        for _ in 0..120 {
            clock.set(now);
            if matches!(a.poll(now), LeaseAction::Create(_)) {
                creates += 1;
            }
            let wake = drive(&mut a, &store, false, now);
            drive(&mut b, &store, false, now);
            assert!(!a.is_ready(now));
            let holder = block_on(store.list()).unwrap().leases.into_iter().find(|l| l.subnet == s).unwrap();
            assert_eq!(holder.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 2), "A overwrote B");
            now = wake.min(now + SEC);
        }
        assert!(creates >= 3, "A keeps trying create-if-absent ({creates} tries in 2 min)");
        let evs = events(&mut a);
        assert!(
            evs.contains(&KeeperEvent::Conflict { subnet: s, holder: Some(Ipv4Addr::new(198, 18, 0, 2)) }),
            "{evs:?}"
        );
        assert_eq!(a.status(now).phase, KeeperPhase::Conflict);
        assert_eq!(a.lease().map(|l| l.subnet), Some(s), "existing pods keep forwarding meanwhile");
        // The operator (or the daemon, for a node with no pods) moves A.
        assert!(a.take_new_subnet(now));
        drive(&mut a, &store, false, now);
        let (moved, source) = acquired(&mut a);
        assert_eq!(source, AcquireSource::NewSubnet);
        assert_ne!(moved.subnet, s);
        assert!(a.is_ready(now));
    }

    #[test]
    fn revocation_seen_in_the_watch_recreates_the_same_subnet() {
        let clock = Clock::new();
        let store = clock.store();
        let mut k = LeaseKeeper::new(cfg10(1));
        drive(&mut k, &store, false, t0());
        let (lease, _) = acquired(&mut k);
        let now = t0() + 2 * SEC;
        clock.set(now);
        assert!(block_on(store.delete(lease.subnet)).unwrap());
        k.on_lease_event(&LeaseEvent::Removed(lease.subnet), now);
        assert_eq!(events(&mut k), vec![KeeperEvent::Lost { subnet: lease.subnet }]);
        assert!(!k.is_ready(now));
        assert!(matches!(k.poll(now), LeaseAction::Create(l) if l.subnet == lease.subnet));
        drive(&mut k, &store, false, now);
        let (back, source) = acquired(&mut k);
        assert_eq!((back.subnet, source), (lease.subnet, AcquireSource::Recreated));
        // Events about other subnets, or our own renewals, change nothing.
        k.on_lease_event(&LeaseEvent::Removed(net("10.244.200.0/24")), now);
        k.on_lease_event(&LeaseEvent::Added(back.clone()), now);
        assert!(k.is_ready(now));
    }

    #[test]
    fn watch_event_from_another_holder_is_a_conflict() {
        let clock = Clock::new();
        let store = clock.store();
        let mut k = LeaseKeeper::new(cfg10(1));
        drive(&mut k, &store, false, t0());
        let (lease, _) = acquired(&mut k);
        let theirs = SubnetLease { attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 9), "udp"), ..lease.clone() };
        k.on_lease_event(&LeaseEvent::Added(theirs), t0());
        assert_eq!(
            events(&mut k),
            vec![KeeperEvent::Conflict { subnet: lease.subnet, holder: Some(Ipv4Addr::new(198, 18, 0, 9)) }]
        );
        // When the other holder's record disappears, we take our subnet back at once.
        k.on_lease_event(&LeaseEvent::Removed(lease.subnet), t0() + SEC);
        assert!(matches!(k.poll(t0() + SEC), LeaseAction::Create(l) if l.subnet == lease.subnet));
    }

    #[test]
    fn lost_create_race_relists_and_moves_on() {
        let clock = Clock::new();
        let store = clock.store();
        let s = net("10.244.5.0/24");
        let mut a = LeaseKeeper::new(KeeperConfig { previous_subnet: Some(s), ..cfg10(1) });
        assert_eq!(a.poll(t0()), LeaseAction::List);
        block_on(execute(&mut a, &store, LeaseAction::List, t0));
        let LeaseAction::Create(mine) = a.poll(t0()) else { panic!("expected a create") };
        assert_eq!(mine.subnet, s);
        // B wins the race between A's list and A's create.
        let theirs = SubnetLease { attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 2), "udp"), ..mine.clone() };
        assert!(block_on(store.create(&theirs, 10 * SEC)).unwrap().is_some());
        block_on(execute(&mut a, &store, LeaseAction::Create(mine), t0));
        assert_eq!(a.poll(t0()), LeaseAction::List, "re-list at once after a lost race");
        drive(&mut a, &store, false, t0());
        assert_ne!(a.lease().unwrap().subnet, s);
        assert_eq!(block_on(store.list()).unwrap().leases.len(), 2);
    }

    #[test]
    fn stale_own_lease_outside_the_config_is_released() {
        let clock = Clock::new();
        let store = clock.store();
        let stale = SubnetLease {
            subnet: net("10.244.9.0/25"),
            attrs: LeaseAttrs::new(Ipv4Addr::new(198, 18, 0, 1), "udp"),
            expiration: None,
            created: Revision(0),
        };
        block_on(store.create(&stale, DAY)).unwrap();
        let mut k = LeaseKeeper::new(cfg10(1));
        assert_eq!(k.poll(t0()), LeaseAction::List);
        block_on(execute(&mut k, &store, LeaseAction::List, t0));
        assert!(matches!(k.poll(t0()), LeaseAction::Release(l) if l.subnet == stale.subnet));
        drive(&mut k, &store, false, t0());
        let leases = block_on(store.list()).unwrap().leases;
        assert_eq!(leases.len(), 1);
        assert_eq!(leases[0].subnet.prefix_len(), 24);
    }

    #[test]
    fn no_free_subnet_backs_off_and_retries() {
        let clock = Clock::new();
        let store = clock.store();
        let tiny = r#"{"Network":"10.244.0.0/28"}"#;
        for host in 1..=3 {
            let mut k = LeaseKeeper::new(cfg(tiny, host, 10 * SEC, 3 * SEC));
            drive(&mut k, &store, false, t0());
            assert!(k.is_ready(t0()));
        }
        let mut k = LeaseKeeper::new(cfg(tiny, 4, 10 * SEC, 3 * SEC));
        let wake = drive(&mut k, &store, false, t0());
        assert!(events(&mut k).contains(&KeeperEvent::NoFreeSubnet));
        assert!(wake > t0() && wake <= t0() + SEC);
        // Once the others' leases expire, the fourth node gets one.
        let later = t0() + 11 * SEC;
        clock.set(later);
        drive(&mut k, &store, false, later);
        assert!(k.is_ready(later));
    }

    #[test]
    fn new_attrs_are_published_at_once_and_release_stops() {
        let clock = Clock::new();
        let store = clock.store();
        let mut k = LeaseKeeper::new(cfg10(1));
        drive(&mut k, &store, false, t0());
        let mut attrs = k.attrs().clone();
        attrs.backend_data = serde_json::json!({"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"});
        k.set_attrs(attrs.clone());
        assert!(matches!(k.poll(t0() + SEC), LeaseAction::Renew(l) if l.attrs == attrs));
        drive(&mut k, &store, false, t0() + SEC);
        assert_eq!(block_on(store.list()).unwrap().leases[0].attrs, attrs);
        let lease = k.release().unwrap();
        assert!(block_on(store.release(&lease)).unwrap());
        assert!(matches!(k.poll(t0() + SEC), LeaseAction::WaitUntil(_)));
        assert_eq!(k.status(t0()).phase, KeeperPhase::Released);
    }

    /// No duplicate ownership under partitions (sans-IO part): 20 nodes on a 31-subnet network with
    /// a 10 s TTL, random partitions from the store. Never two ready holders of overlapping
    /// subnets; once healed, every node holds a lease within 30 s (the daemon's policy for a node
    /// with no pods: take a new subnet on conflict).
    #[test]
    fn randomized_partitions_never_give_two_ready_owners() {
        let network = r#"{"Network":"10.244.0.0/25","SubnetLen":30}"#;
        for trial in 0..40u64 {
            let clock = Clock::new();
            let store = clock.store();
            let mut rng = StdRng::seed_from_u64(trial);
            let mut nodes: Vec<LeaseKeeper> = (1..=20u8)
                .map(|h| {
                    LeaseKeeper::new(KeeperConfig {
                        seed: trial * 100 + u64::from(h),
                        ..cfg(network, h, 10 * SEC, 3 * SEC)
                    })
                })
                .collect();
            let mut cut_until = vec![t0(); nodes.len()];
            let step = Duration::from_millis(500);
            let heal_at = t0() + 150 * SEC;
            let end = heal_at + 30 * SEC;
            let mut now = t0();
            while now <= end {
                clock.set(now);
                store.tick();
                for (i, k) in nodes.iter_mut().enumerate() {
                    if now < heal_at && rng.random_bool(0.01) {
                        cut_until[i] = now + Duration::from_secs(rng.random_range(5..40));
                    }
                    let cut = now < cut_until[i] && now < heal_at;
                    drive(k, &store, cut, now);
                    if events(k).iter().any(|e| matches!(e, KeeperEvent::Conflict { .. })) {
                        assert!(k.take_new_subnet(now));
                        drive(k, &store, cut, now);
                    }
                }
                let ready: Vec<Ipv4Net> =
                    nodes.iter().filter(|k| k.is_ready(now)).filter_map(|k| k.lease().map(|l| l.subnet)).collect();
                for (i, a) in ready.iter().enumerate() {
                    for b in &ready[i + 1..] {
                        assert!(
                            !a.contains(&b.network()) && !b.contains(&a.network()),
                            "trial {trial}: {a} and {b} both ready"
                        );
                    }
                }
                now += step;
            }
            let not_ready: Vec<_> = nodes.iter().filter(|k| !k.is_ready(end)).map(|k| k.status(end)).collect();
            assert!(not_ready.is_empty(), "trial {trial}: 30 s after healing: {not_ready:?}");
        }
    }
}
