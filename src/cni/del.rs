//! DEL: detaches a container. Succeeds when repeated, when the netns is gone, and when the
//! interface or the address are already gone (SPEC.md: DEL is best effort and idempotent).
//!
//! The container's namespace is never entered: deleting the host end of the veth deletes the
//! container end too, wherever it is, and a deleted namespace took both with it already. The
//! host end is found by its derived name and deleted unless its alias says it belongs to
//! another attachment (a name-hash collision). Only then is the address released, so an
//! address is never free while an interface might still carry it. With the daemon
//! unreachable, DEL fails with code 11 after the local cleanup: the runtime retries DEL, and
//! the address is not leaked.

use super::args::CniArgs;
use super::ipam::Ipam;
use super::netns::Netlink;
use super::types::{CniError, NetConf};
use super::veth;

/// Runs DEL.
///
/// # Errors
/// Code 100 if the host end exists but cannot be deleted (the address is then kept), 11 if
/// the daemon cannot be reached to release the address, 103 if it refuses.
pub fn run(args: &CniArgs, conf: &NetConf) -> Result<(), CniError> {
    let (cid, ifname) = args.attachment()?;
    let host = Netlink::here()?;
    let host_name = veth::host_veth_name(cid, ifname);
    host.block_on(async {
        let Some(link) = veth::link(host.handle(), &host_name).await? else { return Ok(()) };
        if let Some(o) = link.owner() {
            if o.container_id != cid.as_str() || o.ifname != ifname.as_str() {
                // Same derived name, someone else's attachment: not ours to delete.
                return Ok(());
            }
        }
        veth::delete(host.handle(), link.index, &host_name).await
    })?;
    Ipam::new(conf.socket()).release(cid, ifname)?;
    Ok(())
}
