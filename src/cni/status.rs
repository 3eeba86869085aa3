//! STATUS (spec 1.1.0): whether ADD can be served now, which is whether the weft daemon answers
//! and is ready to hand out addresses. Success prints nothing; otherwise code 50 (the plugin
//! cannot serve ADD). STATUS is informational: runtimes still send the other commands.

use super::ipam::Ipam;
use super::types::{CniError, NetConf};

/// Runs STATUS.
///
/// # Errors
/// Code 50 with the daemon's reason.
pub fn run(conf: &NetConf) -> Result<(), CniError> {
    Ipam::new(conf.socket()).ready().map_err(|e| {
        CniError::new(CniError::NOT_AVAILABLE, format!("weft cannot serve ADD: {}", e.msg)).with_details(e.details)
    })
}
