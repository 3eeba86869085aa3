//! The I/O half of the lease loop: run one [`LeaseAction`] against a store and feed the result
//! back into the keeper.
//!
//! Deliberately runtime-agnostic and without sleeping, so that the daemon owns the waiting
//! (and can wake early on a watch event or shutdown):
//!
//! ```ignore
//! loop {
//!     match keeper.poll(SystemTime::now()) {
//!         LeaseAction::WaitUntil(t) => tokio::select! {
//!             _ = sleep_until(t) => {}
//!             Some(Ok(batch)) = watch.next() => for e in &batch.events { keeper.on_lease_event(e, SystemTime::now()) },
//!         },
//!         action => lease_loop::execute(&mut keeper, &store, action, SystemTime::now).await,
//!     }
//!     while let Some(event) = keeper.poll_event() { /* write subnet.env, readiness, metrics */ }
//! }
//! ```

use std::time::SystemTime;

use crate::keeper::{LeaseAction, LeaseKeeper};
use crate::store::LeaseStore;

/// Performs `action` against `store` and reports the outcome to `keeper`, reading `clock` after
/// the call returns. [`LeaseAction::WaitUntil`] does nothing: waiting is the caller's job.
pub async fn execute<S: LeaseStore>(
    keeper: &mut LeaseKeeper,
    store: &S,
    action: LeaseAction,
    clock: impl Fn() -> SystemTime,
) {
    match action {
        LeaseAction::List => {
            let result = store.list().await;
            keeper.on_listed(result, clock());
        }
        LeaseAction::Create(lease) => {
            let result = store.create(&lease, keeper.ttl()).await;
            keeper.on_created(result, clock());
        }
        LeaseAction::Renew(lease) => {
            let result = store.renew(&lease, keeper.ttl()).await;
            keeper.on_renewed(result, clock());
        }
        LeaseAction::Release(lease) => {
            let result = store.release(&lease).await;
            keeper.on_released(result, clock());
        }
        LeaseAction::WaitUntil(_) => {}
    }
}
