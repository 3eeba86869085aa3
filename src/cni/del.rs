//! DEL: detaches a container. Succeeds when repeated, when the netns is gone, when the
//! interface or the address are already gone, and while the daemon is down (CNI SPEC.md: DEL is
//! best effort and must not fail for missing resources; kubelet keeps a pod terminating until
//! its DEL succeeds).
//!
//! 1. The host end of the veth is found by its derived name and deleted, unless its alias says
//!    it belongs to another attachment (a name-hash collision). The container's namespace is
//!    never entered: deleting the host end deletes the container end too, wherever it is, and
//!    a deleted namespace took both with it already. If the host end cannot be deleted, DEL
//!    fails (100) and nothing is released: an address is never free while an interface might
//!    still carry it.
//! 2. The daemon frees the address. If it cannot be reached (no socket, nobody listening, no
//!    answer within its timeout, or it went away mid-request), the release is recorded in
//!    `pendingReleaseDir` (default `/var/lib/weft/pending-release`, which is also the daemon's
//!    default `pending_release_dir`) and DEL succeeds. The daemon frees the address when it is
//!    back, at start and every 30 s, unless an ADD of the same attachment came first; that ADD
//!    then keeps the address (`daemon::pending` explains the order). DEL fails (11, the
//!    runtime retries) only if even the record cannot be written.
//! 3. A daemon that answers but refuses fails DEL with 103, as any refusal: it is up, and
//!    nothing is missing; it is broken, and saying so beats pretending.

use weft_ipam::{Attachment, PendingRelease, PendingReleases};

use super::args::CniArgs;
use super::ipam::{Ipam, Release};
use super::netns::Netlink;
use super::types::{CniError, ConfError, NetConf};
use super::veth;

/// Runs DEL.
///
/// # Errors
/// Code 100 if the host end exists but cannot be deleted (the address is then kept), 103 if
/// the daemon refuses the release, 11 if the daemon cannot be reached and the release cannot
/// be recorded either, 7 if `pendingReleaseDir` is not absolute.
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
    let ipam = Ipam::new(conf.socket());
    match ipam.try_release(cid, ifname)? {
        Release::Done(_) => Ok(()),
        Release::Unreachable(why) => {
            let spool = pending_releases(conf)?;
            let entry = PendingRelease {
                attachment: Attachment { container_id: cid.clone(), if_name: ifname.clone() },
                socket: ipam.socket().to_path_buf(),
            };
            spool.record(&entry).map_err(|e| {
                CniError::new(
                    CniError::TRY_AGAIN_LATER,
                    format!("{why}; and the release cannot be recorded for later in {}: {e}", spool.dir().display()),
                )
            })
        }
    }
}

/// The configuration's pending-release directory. ADD checks it too, so that a bad value is
/// refused when a pod starts rather than found when the daemon is down at its DEL.
///
/// # Errors
/// 7 if `pendingReleaseDir` is relative: the runtime's working directory is no place for it.
pub fn pending_releases(conf: &NetConf) -> Result<PendingReleases, CniError> {
    let dir = conf.pending_release_dir();
    if !dir.is_absolute() {
        return Err(ConfError::Invalid {
            field: "pendingReleaseDir",
            value: dir.display().to_string(),
            reason: "must be an absolute path (the daemon's pending_release_dir)",
        }
        .into());
    }
    Ok(PendingReleases::new(dir))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};
    use std::thread::JoinHandle;

    use super::*;

    fn args(command: &str, netns: Option<&str>) -> CniArgs {
        let mut env: HashMap<&str, String> =
            [("CNI_COMMAND", command), ("CNI_CONTAINERID", "ctr-1"), ("CNI_IFNAME", "eth0")]
                .into_iter()
                .map(|(k, v)| (k, v.to_owned()))
                .collect();
        if let Some(n) = netns {
            env.insert("CNI_NETNS", n.to_owned());
        }
        CniArgs::from_env(&|k: &str| env.get(k).cloned()).unwrap()
    }

    fn conf(socket: &Path, pending: &Path) -> NetConf {
        let v = serde_json::json!({
            "cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
            "socket": socket, "pendingReleaseDir": pending,
        });
        NetConf::parse(v.to_string().as_bytes()).unwrap().0
    }

    /// A daemon that takes one request, answers `reply` (or hangs up without answering), and
    /// hands back the request line.
    fn daemon(dir: &Path, reply: Option<&'static str>) -> (PathBuf, JoinHandle<String>) {
        let socket = dir.join("weft.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&mut s).read_line(&mut line).unwrap();
            if let Some(r) = reply {
                s.write_all(format!("{r}\n").as_bytes()).unwrap();
            }
            line
        });
        (socket, t)
    }

    fn entries(spool: &Path) -> Vec<String> {
        let Ok(dir) = std::fs::read_dir(spool) else { return Vec::new() };
        let mut names: Vec<String> =
            dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n != "lock").collect();
        names.sort();
        names
    }

    #[test]
    fn del_with_the_daemon_down_records_the_release_and_succeeds_every_time() {
        let tmp = tempfile::tempdir().unwrap();
        let (socket, spool) = (tmp.path().join("no-daemon.sock"), tmp.path().join("pending"));
        let c = conf(&socket, &spool);
        run(&args("DEL", None), &c).unwrap();
        run(&args("DEL", None), &c).unwrap();
        assert_eq!(entries(&spool), ["ctr-1:eth0"]);
        let recorded = PendingReleases::new(&spool)
            .with_lock(|s| s.get(&Attachment::new("ctr-1", "eth0").unwrap()))
            .unwrap()
            .flatten()
            .unwrap();
        assert_eq!(recorded.socket, socket, "the entry names the daemon it is for");
    }

    #[test]
    fn del_with_a_daemon_that_hangs_up_records_the_release() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("pending");
        let (socket, daemon) = daemon(tmp.path(), None);
        run(&args("DEL", None), &conf(&socket, &spool)).unwrap();
        assert!(daemon.join().unwrap().contains("\"release\""));
        assert_eq!(entries(&spool), ["ctr-1:eth0"]);
    }

    #[test]
    fn del_with_a_daemon_that_answers_records_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("pending");
        let (socket, daemon) = daemon(tmp.path(), Some(r#"{"ok":{"released":["10.244.1.2"]}}"#));
        run(&args("DEL", None), &conf(&socket, &spool)).unwrap();
        daemon.join().unwrap();
        assert!(!spool.exists());
    }

    #[test]
    fn del_with_a_daemon_that_refuses_still_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("pending");
        let reply = r#"{"error":{"code":"store","message":"/var/lib/weft/pods: read-only file system"}}"#;
        let (socket, daemon) = daemon(tmp.path(), Some(reply));
        let e = run(&args("DEL", None), &conf(&socket, &spool)).unwrap_err();
        daemon.join().unwrap();
        assert_eq!(e.code, CniError::DAEMON, "{e}");
        assert!(e.msg.contains("read-only file system"), "{e}");
        assert!(!spool.exists(), "a refusal is not recorded as pending");
    }

    #[test]
    fn del_fails_with_11_when_the_release_cannot_be_recorded_either() {
        let tmp = tempfile::tempdir().unwrap();
        let not_a_dir = tmp.path().join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let e = run(&args("DEL", None), &conf(&tmp.path().join("no.sock"), &not_a_dir.join("pending"))).unwrap_err();
        assert_eq!(e.code, CniError::TRY_AGAIN_LATER, "{e}");
        assert!(e.msg.contains("no.sock") && e.msg.contains("file/pending"), "{e}");
    }

    #[test]
    fn a_relative_pending_release_dir_is_refused_by_add_and_del() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(&tmp.path().join("no.sock"), Path::new("pending"));
        let e = run(&args("DEL", None), &c).unwrap_err();
        assert_eq!(e.code, CniError::INVALID_CONFIG, "{e}");
        assert!(e.msg.contains("pendingReleaseDir"), "{e}");
        // ADD refuses it before looking at anything else (the netns here does not exist).
        let e = super::super::add::run(&args("ADD", Some("/nonexistent/netns")), &c, std::time::SystemTime::now())
            .unwrap_err();
        assert_eq!(e.code, CniError::INVALID_CONFIG, "{e}");
        assert!(!Path::new("pending").exists());
    }
}
