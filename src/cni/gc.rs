//! GC (spec 1.1.0): frees what belongs to attachments the runtime no longer knows.
//!
//! The valid attachments are the union of `cni.dev/valid-attachments` and
//! `cni.dev/attachments` (the spec-v1.1.0 tag's name; libcni sends both). Without either key
//! GC refuses (code 7) instead of reading "nothing is valid" into a missing list; an explicitly
//! empty list does free everything, as the spec says.
//!
//! 1. Host veths of this network (by their alias) whose attachment is not valid are deleted,
//!    which removes the container end and the host's route with them; veths younger than
//!    [`VETH_GC_GRACE`] are spared, like the daemon spares young allocations, so an ADD racing
//!    the runtime's listing keeps its interface (antrea#8239).
//! 2. The daemon frees every allocation not in the valid list (older than its own grace).
//!
//! GC continues past errors and reports them all in one error's details.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use weft_ipam::Attachment;

use super::ipam::Ipam;
use super::netns::Netlink;
use super::types::{CniError, GcAttachment, NetConf};
use super::veth;
use crate::daemon::api::AttachmentRef;

/// Host veths younger than this survive GC even when their attachment is not in the list.
pub const VETH_GC_GRACE: Duration = Duration::from_secs(60);

/// Runs GC.
///
/// # Errors
/// 7 without a valid-attachment list; otherwise the first failure's code, with every failure in
/// the details.
pub fn run(conf: &NetConf, now: SystemTime) -> Result<(), CniError> {
    let valid = conf.gc_valid().ok_or_else(|| {
        CniError::new(
            CniError::INVALID_CONFIG,
            "cni.dev/valid-attachments: missing (GC refuses to treat a missing list as an empty one)",
        )
    })?;
    let mut errors: Vec<CniError> = Vec::new();
    if let Err(e) = delete_stale_veths(conf, &valid, now) {
        errors.push(e);
    }
    // An entry that is not a valid attachment cannot own an allocation: the daemon validates
    // every allocation it makes. Dropping it keeps one odd entry from failing the whole GC.
    let refs: Vec<AttachmentRef> = valid
        .iter()
        .filter(|a| Attachment::new(&a.container_id, &a.ifname).is_ok())
        .map(|a| AttachmentRef { container_id: a.container_id.clone(), ifname: a.ifname.clone() })
        .collect();
    if let Err(e) = Ipam::new(conf.socket()).gc(refs) {
        errors.push(e);
    }
    match errors.first() {
        None => Ok(()),
        Some(first) => {
            let details = errors.iter().map(|e| e.msg.clone()).collect::<Vec<_>>().join("; ");
            Err(CniError::new(first.code, format!("GC finished with {} error(s)", errors.len())).with_details(details))
        }
    }
}

fn delete_stale_veths(conf: &NetConf, valid: &BTreeSet<GcAttachment>, now: SystemTime) -> Result<(), CniError> {
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let host = Netlink::here()?;
    let links = host.block_on(veth::our_links(host.handle()))?;
    let mut failures = Vec::new();
    for (link, owner) in links {
        if owner.network != conf.name {
            continue;
        }
        let key = GcAttachment { container_id: owner.container_id.clone(), ifname: owner.ifname.clone() };
        if valid.contains(&key) || now_secs.saturating_sub(owner.created_secs) < VETH_GC_GRACE.as_secs() {
            continue;
        }
        if let Err(e) = host.block_on(veth::delete(host.handle(), link.index, &link.name)) {
            failures.push(e.to_string());
        }
    }
    if failures.is_empty() { Ok(()) } else { Err(CniError::new(CniError::NETLINK, failures.join("; "))) }
}
