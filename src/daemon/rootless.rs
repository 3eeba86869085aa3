//! Rootless mode: an overlay node run by an ordinary user.
//!
//! No flannel, Calico or Weave node runs without root. weft can, because all it needs is a
//! TUN and a UDP socket:
//!
//! 1. At start, before any thread exists, the process enters a **user namespace** of its own
//!    ([`enter_user_namespace`]), mapping the user to root inside it (setgroups denied, as an
//!    unprivileged mapping requires). That gives it capabilities over namespaces it creates,
//!    and none over the host's.
//! 2. One thread unshares a **network namespace** ([`Overlay`]) and stays there: the TUN
//!    queues are opened and the netlink socket for the overlay's routes is created on it, so
//!    they live in that namespace, while every other thread, and so the UDP sockets, the
//!    healthz listener and the underlay queries, stays in the host's. The overlay namespace has
//!    the TUN and loopback only: pod traffic has no other way out, encapsulated or not.
//! 3. Processes join the overlay with `weft exec -- CMD` (the paths are in `weft status`:
//!    `/proc/<pid>/task/<tid>/ns/{user,net}` of that thread); `podman run --network
//!    ns:<netns>` and `nsenter --user=<userns> --net=<netns>` work the same way.
//!
//! State goes under the user's XDG directories ([`Dirs`]). The ports (8285, 8472) are above
//! 1024, so the bind needs no privilege. What cannot work without root is refused at start,
//! naming it: `ip_masq` and `DirectRouting` program the host's own routing and firewall.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use nix::sched::{CloneFlags, unshare};

use crate::config::RawConfig;

/// Why rootless mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum RootlessError {
    /// The kernel refused a user namespace.
    #[error(
        "rootless: cannot create a user namespace ({0}): unprivileged user namespaces are off \
         (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces, or an AppArmor \
         restriction such as kernel.apparmor_restrict_unprivileged_userns)"
    )]
    UserNamespace(nix::Error),
    /// Writing the uid/gid map failed.
    #[error("rootless: cannot write {path}: {source}")]
    Map {
        /// The file.
        path: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The process already runs threads (a user namespace takes a single-threaded process).
    #[error("rootless: the process is multi-threaded; the user namespace must be entered first")]
    Threaded,
    /// The overlay network namespace could not be created.
    #[error("rootless: cannot create the overlay network namespace: {0}")]
    NetNamespace(nix::Error),
    /// The overlay thread is gone.
    #[error("rootless: the overlay namespace thread exited")]
    ThreadGone,
    /// A namespace given by path could not be joined.
    #[error("rootless: cannot join {path}: {reason}", path = .0.display(), reason = .1)]
    Join(PathBuf, String),
    /// The user may not open `/dev/net/tun`.
    #[error(
        "rootless: /dev/net/tun is not open to this user ({0}): distributions ship it mode 0666 \
         (chmod 0666 /dev/net/tun, or a udev rule: KERNEL==\"tun\", MODE=\"0666\")"
    )]
    NoTun(nix::Error),
    /// Neither `XDG_RUNTIME_DIR` nor a fallback is usable.
    #[error(
        "rootless: {0} is not set; set it (a login session or `systemd --user` does) or give the paths in the config"
    )]
    NoDir(&'static str),
}

/// Whether the process runs without root and without CAP_NET_ADMIN (a non-root service
/// given that capability, as systemd's `AmbientCapabilities=` does, runs as root mode does):
/// then weft runs rootless even without `--rootless`.
pub fn is_unprivileged() -> bool {
    !nix::unistd::geteuid().is_root()
        && !has_net_admin(&std::fs::read_to_string("/proc/self/status").unwrap_or_default())
}

/// Whether `CapEff` in a `/proc/<pid>/status` text has CAP_NET_ADMIN (bit 12).
fn has_net_admin(status: &str) -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// Whether this user may open `/dev/net/tun` (checked before anything else, so the error
/// names the device rather than a failed TUN ioctl later).
///
/// # Errors
/// [`RootlessError::NoTun`].
pub fn check_tun_access() -> Result<(), RootlessError> {
    use nix::unistd::{AccessFlags, access};
    access("/dev/net/tun", AccessFlags::R_OK | AccessFlags::W_OK).map_err(RootlessError::NoTun)
}

/// Enters a new user namespace in which the caller's uid and gid are 0, or joins `existing`
/// (a rootlesskit or podman user namespace the same user owns, given by its `ns/user` path).
/// Must run before the process starts any thread.
///
/// # Errors
/// [`RootlessError`] naming what the kernel refused.
pub fn enter_user_namespace(existing: Option<&Path>) -> Result<(), RootlessError> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    if std::fs::read_dir("/proc/self/task").map(Iterator::count).unwrap_or(1) > 1 {
        return Err(RootlessError::Threaded);
    }
    if let Some(path) = existing {
        let f = std::fs::File::open(path).map_err(|e| RootlessError::Join(path.to_path_buf(), e.to_string()))?;
        return nix::sched::setns(&f, CloneFlags::CLONE_NEWUSER)
            .map_err(|e| RootlessError::Join(path.to_path_buf(), e.to_string()));
    }
    unshare(CloneFlags::CLONE_NEWUSER).map_err(RootlessError::UserNamespace)?;
    let write = |path: &'static str, text: String| {
        std::fs::write(path, text).map_err(|source| RootlessError::Map { path, source })
    };
    write("/proc/self/setgroups", "deny".into())?;
    write("/proc/self/uid_map", format!("0 {uid} 1\n"))?;
    write("/proc/self/gid_map", format!("0 {gid} 1\n"))?;
    Ok(())
}

type Job = Box<dyn FnOnce() + Send>;

/// The overlay network namespace, held by a thread that lives in it and runs what must be
/// created there (the TUN queues, the netlink socket). Clones share the thread.
#[derive(Clone, Debug)]
pub struct Overlay {
    jobs: mpsc::Sender<Job>,
    tid: i32,
}

impl Overlay {
    /// Creates the namespace on a new thread, which stays in it, or has the thread join
    /// `existing` (a network namespace owned by the user namespace joined before). Call after
    /// [`enter_user_namespace`].
    ///
    /// # Errors
    /// [`RootlessError::NetNamespace`] when the kernel refuses, [`RootlessError::Join`].
    pub fn create(existing: Option<&Path>) -> Result<Self, RootlessError> {
        let target = match existing {
            Some(p) => Some((
                p.to_path_buf(),
                std::fs::File::open(p).map_err(|e| RootlessError::Join(p.to_path_buf(), e.to_string()))?,
            )),
            None => None,
        };
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready, started) = mpsc::channel();
        std::thread::Builder::new()
            .name("weft-overlay-ns".into())
            .spawn(move || {
                let unshared = match &target {
                    Some((p, f)) => nix::sched::setns(f, CloneFlags::CLONE_NEWNET)
                        .map_err(|e| RootlessError::Join(p.clone(), e.to_string())),
                    None => unshare(CloneFlags::CLONE_NEWNET).map_err(RootlessError::NetNamespace),
                }
                .map(|()| nix::unistd::gettid().as_raw());
                let ok = unshared.is_ok();
                let _ = ready.send(unshared);
                if ok {
                    // Runs jobs until the daemon drops the sender, then keeps the namespace for
                    // `weft exec` only as long as the process lives.
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                    loop {
                        std::thread::park();
                    }
                }
            })
            .map_err(|e| RootlessError::NetNamespace(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EAGAIN))))?;
        let tid = started.recv().map_err(|_| RootlessError::ThreadGone)??;
        Ok(Self { jobs, tid })
    }

    /// Runs `f` on the thread inside the overlay namespace and returns its result.
    ///
    /// # Errors
    /// [`RootlessError::ThreadGone`] if the thread is gone.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, RootlessError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| RootlessError::ThreadGone)?;
        rx.recv().map_err(|_| RootlessError::ThreadGone)
    }

    /// Links `dir/userns` and `dir/netns` to [`ns_paths`](Self::ns_paths), replacing what an
    /// earlier run left: stable names for podman's `--network ns:PATH` and nsenter while this
    /// daemon runs (they dangle once it is gone, until the next start replaces them).
    ///
    /// # Errors
    /// Creating the directory or a link.
    pub fn link_into(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let (userns, netns) = self.ns_paths();
        for (name, target) in [("userns", userns), ("netns", netns)] {
            let tmp = dir.join(format!(".{name}.tmp"));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&target, &tmp)?;
            std::fs::rename(&tmp, dir.join(name))?;
        }
        Ok(())
    }

    /// The namespace files of the overlay thread: (user, net), for `weft exec`, nsenter and
    /// podman.
    pub fn ns_paths(&self) -> (PathBuf, PathBuf) {
        let base = PathBuf::from(format!("/proc/{}/task/{}/ns", std::process::id(), self.tid));
        (base.join("user"), base.join("net"))
    }
}

/// Whether this user may lock `bytes` (io_uring's registered buffers count against
/// `RLIMIT_MEMLOCK` without CAP_IPC_LOCK in the host's user namespace). Raises the soft limit
/// to the hard one first, which needs no privilege. `Err` says why io_uring cannot be used.
///
/// # Errors
/// The limit, the need, and how to raise it.
pub fn memlock_allows(bytes: usize) -> Result<(), String> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).map_err(|e| format!("getrlimit(RLIMIT_MEMLOCK): {e}"))?;
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard);
    }
    if hard == nix::sys::resource::RLIM_INFINITY || hard >= bytes as u64 {
        return Ok(());
    }
    Err(format!(
        "io_uring's registered buffers need {} MiB of locked memory and RLIMIT_MEMLOCK allows this user {} MiB (raise it: ulimit -l, LimitMEMLOCK= in a unit, or /etc/security/limits.conf)",
        bytes >> 20,
        hard >> 20
    ))
}

/// Joins the overlay of a running rootless daemon: its user namespace (which the same user
/// may enter), then its network namespace. The calling process must be single-threaded.
///
/// # Errors
/// The namespace file that could not be opened or entered.
pub fn join(userns: &str, netns: &str) -> Result<(), String> {
    for (path, kind) in [(userns, CloneFlags::CLONE_NEWUSER), (netns, CloneFlags::CLONE_NEWNET)] {
        let f = std::fs::File::open(path).map_err(|e| format!("{path}: {e}"))?;
        nix::sched::setns(&f, kind).map_err(|e| format!("entering {path}: {e}"))?;
    }
    Ok(())
}

/// Where a rootless node keeps its state: `$XDG_RUNTIME_DIR/weft/` for what lives as long as
/// the session (API socket, `subnet.env`), `$XDG_DATA_HOME/weft/` (default
/// `~/.local/share/weft/`) for what must survive a reboot (the file store, lease cache, pod
/// addresses, pending releases).
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Dirs {
    /// `$XDG_RUNTIME_DIR/weft`.
    pub runtime: PathBuf,
    /// `$XDG_DATA_HOME/weft`.
    pub data: PathBuf,
}

impl Dirs {
    /// From the environment.
    ///
    /// # Errors
    /// [`RootlessError::NoDir`] when `XDG_RUNTIME_DIR` is unset, or `XDG_DATA_HOME` and
    /// `HOME` both are.
    pub fn from_env() -> Result<Self, RootlessError> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let runtime = var("XDG_RUNTIME_DIR").ok_or(RootlessError::NoDir("XDG_RUNTIME_DIR"))?;
        let data = var("XDG_DATA_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".local/share")))
            .ok_or(RootlessError::NoDir("XDG_DATA_HOME (or HOME)"))?;
        Ok(Self { runtime: runtime.join("weft"), data: data.join("weft") })
    }

    /// The default API socket, which the CLI looks for too.
    pub fn api_socket(&self) -> PathBuf {
        self.runtime.join("weft.sock")
    }

    /// Gives every path `raw` leaves unset its rootless default (the file and the flags still
    /// win).
    pub fn fill(&self, raw: &mut RawConfig) {
        let node = raw.node_name.clone().unwrap_or_else(|| "node".into());
        let set = |field: &mut Option<PathBuf>, path: PathBuf| {
            field.get_or_insert(path);
        };
        set(&mut raw.api_socket, self.api_socket());
        set(&mut raw.pod_dir, self.data.join("pods").join(&node));
        set(&mut raw.pending_release_dir, self.data.join("pending-release"));
        // The node key: where the backend is wireguard, or may be (lease mode: the network
        // config decides, and the path is dropped for other backends).
        if raw.subnet.is_none() || raw.backend.as_deref() == Some("wireguard") {
            set(&mut raw.wireguard_key_file, self.data.join("keys").join(format!("{node}.key")));
        }
        // Lease mode only (a static config refuses these).
        if raw.subnet.is_none() {
            set(&mut raw.store_dir, self.data.join("store"));
            set(&mut raw.lease_cache, self.data.join("leases").join(format!("{node}.json")));
            if raw.flannel_paths != Some(true) {
                set(&mut raw.subnet_file, self.runtime.join("subnet.env"));
            }
        }
    }
}

/// The CLI's default API socket: the rootless one for an unprivileged user whose
/// `XDG_RUNTIME_DIR` is set, else the system one.
pub fn default_api_socket() -> PathBuf {
    match (is_unprivileged(), Dirs::from_env()) {
        (true, Ok(d)) => d.api_socket(),
        _ => Path::new(crate::config::DEFAULT_API_SOCKET).to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_admin_is_read_from_cap_eff() {
        assert!(has_net_admin("Name:\tweft\nCapEff:\t0000000000001000\n"));
        assert!(has_net_admin("CapEff:\t000001ffffffffff\n"));
        assert!(!has_net_admin("CapEff:\t0000000000000000\n"));
        assert!(!has_net_admin("CapEff:\t0000000000002000\n"), "CAP_NET_RAW alone");
        assert!(!has_net_admin(""));
    }

    #[test]
    fn rootless_paths_fill_only_what_is_unset() {
        let d = Dirs { runtime: "/run/user/1000/weft".into(), data: "/home/u/.local/share/weft".into() };
        let mut raw =
            RawConfig { node_name: Some("n1".into()), subnet_file: Some("/tmp/s.env".into()), ..RawConfig::default() };
        d.fill(&mut raw);
        assert_eq!(raw.api_socket.as_deref(), Some(Path::new("/run/user/1000/weft/weft.sock")));
        assert_eq!(raw.subnet_file.as_deref(), Some(Path::new("/tmp/s.env")), "a given path wins");
        assert_eq!(raw.store_dir.as_deref(), Some(Path::new("/home/u/.local/share/weft/store")));
        assert_eq!(raw.pod_dir.as_deref(), Some(Path::new("/home/u/.local/share/weft/pods/n1")));
        assert_eq!(raw.lease_cache.as_deref(), Some(Path::new("/home/u/.local/share/weft/leases/n1.json")));
        assert_eq!(raw.pending_release_dir.as_deref(), Some(Path::new("/home/u/.local/share/weft/pending-release")));
        assert_eq!(raw.wireguard_key_file.as_deref(), Some(Path::new("/home/u/.local/share/weft/keys/n1.key")));
        // Static mode: no lease-mode paths, which it would refuse.
        let mut st = RawConfig { subnet: Some("10.244.1.0/24".into()), ..RawConfig::default() };
        d.fill(&mut st);
        assert!(st.store_dir.is_none() && st.subnet_file.is_none() && st.lease_cache.is_none());
        assert!(st.wireguard_key_file.is_none(), "a udp static config refuses it");
        assert_eq!(st.api_socket.as_deref(), Some(Path::new("/run/user/1000/weft/weft.sock")));
    }
}
