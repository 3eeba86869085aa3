//! What `/healthz` and `/readyz` answer, with flanneld's semantics: alive while the process
//! runs (and, once started, while its data plane does); ready only when everything a pod
//! needs is in place. Start-up records each step here as it completes; the HTTP server is up
//! from the first moment (before the lease), so a node waiting for its store answers 503
//! with the reason instead of refusing the connection.
//!
//! Ready means, checked in this order (the first one missing is the reason given):
//! 1. the daemon is not stopping;
//! 2. start-up got as far as the data plane (until then: what it waits for);
//! 3. lease mode: the lease is held, not expired, and confirmed by the store (a node started
//!    from its lease cache is not ready until then: its route table is the cache's);
//! 4. lease mode: `subnet.env` is written;
//! 5. the TUN is configured and up;
//! 6. the route table was built at least once (static: from the config; lease mode: from the
//!    store's list, see 3);
//! 7. with `ip_masq`: the masquerade rules are in place (as of the last check);
//! 8. the workers run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::api::ApiState;
use super::masq::MasqState;

/// Start-up progress and what the HTTP endpoints report.
#[derive(Debug)]
pub struct Health {
    lease_mode: bool,
    masq_wanted: bool,
    /// What start-up is doing now, until the data plane is up.
    phase: Mutex<&'static str>,
    /// `subnet.env` written.
    pub subnet_env: AtomicBool,
    /// TUN configured, addressed, routed, up.
    pub tun_up: AtomicBool,
    /// The first route table is in force.
    pub routes_synced: AtomicBool,
    /// Every worker thread was started (the daemon stops when one ends).
    pub workers_running: AtomicBool,
    stopping: Mutex<Option<String>>,
    state: OnceLock<Arc<ApiState>>,
    masq: OnceLock<Arc<MasqState>>,
}

impl Health {
    /// Nothing done yet.
    pub fn new(lease_mode: bool, masq_wanted: bool) -> Self {
        Self {
            lease_mode,
            masq_wanted,
            phase: Mutex::new("starting"),
            subnet_env: AtomicBool::new(false),
            tun_up: AtomicBool::new(false),
            routes_synced: AtomicBool::new(false),
            workers_running: AtomicBool::new(false),
            stopping: Mutex::new(None),
            state: OnceLock::new(),
            masq: OnceLock::new(),
        }
    }

    /// Says what start-up waits for or does now.
    pub fn set_phase(&self, phase: &'static str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
    }

    /// The daemon's state, once the data plane is up.
    pub fn set_state(&self, state: Arc<ApiState>) {
        let _ = self.state.set(state);
    }

    /// The daemon's state, if the data plane is up.
    pub fn state(&self) -> Option<&Arc<ApiState>> {
        self.state.get()
    }

    /// The masquerade keeper's state, once the rules are installed.
    pub fn set_masq(&self, masq: Arc<MasqState>) {
        let _ = self.masq.set(masq);
    }

    /// The masquerade keeper's state, if any.
    pub fn masq(&self) -> Option<&Arc<MasqState>> {
        self.masq.get()
    }

    /// Whether `ip_masq` is on.
    pub fn masq_wanted(&self) -> bool {
        self.masq_wanted
    }

    /// The daemon is going down (`why`): neither live nor ready from now on.
    pub fn stopping(&self, why: impl Into<String>) {
        if let Ok(mut s) = self.stopping.lock() {
            s.get_or_insert_with(|| why.into());
        }
    }

    fn stopping_reason(&self) -> Option<String> {
        self.stopping.lock().ok().and_then(|s| s.clone())
    }

    /// `/healthz`: `Ok` with a word while the process lives and nothing has died; the
    /// reason otherwise.
    ///
    /// # Errors
    /// The reason the daemon is going down.
    pub fn liveness(&self) -> Result<&'static str, String> {
        if let Some(why) = self.stopping_reason() {
            return Err(format!("stopping: {why}"));
        }
        Ok(if self.workers_running.load(Ordering::Relaxed) { "ok" } else { "ok: starting" })
    }

    /// `/readyz`: `Ok` when every condition in the module doc holds.
    ///
    /// # Errors
    /// The first condition that does not, as one line.
    pub fn readiness(&self) -> Result<(), String> {
        if let Some(why) = self.stopping_reason() {
            return Err(format!("stopping: {why}"));
        }
        let Some(state) = self.state.get() else {
            let phase = self.phase.lock().map(|p| *p).unwrap_or("starting");
            return Err(format!("not ready: {phase}"));
        };
        if self.lease_mode {
            state.ready().map_err(|e| e.message)?;
            if !self.subnet_env.load(Ordering::Relaxed) {
                return Err("not ready: subnet.env not written yet".into());
            }
        }
        if !self.tun_up.load(Ordering::Relaxed) {
            return Err("not ready: the TUN is not up".into());
        }
        if !self.routes_synced.load(Ordering::Relaxed) {
            return Err("not ready: the route table was never built".into());
        }
        if self.masq_wanted {
            match self.masq.get() {
                None => return Err("not ready: masquerade rules not installed yet".into()),
                Some(m) if !m.installed.load(Ordering::Relaxed) => {
                    let why = m.last_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
                    return Err(format!("not ready: masquerade rules not in place: {why}"));
                }
                Some(_) => {}
            }
        }
        if !self.workers_running.load(Ordering::Relaxed) {
            return Err("not ready: the data plane is not running".into());
        }
        Ok(())
    }
}
