//! Network namespaces for the plugin: opening `CNI_NETNS`, and running netlink work inside it
//! on a thread of its own.
//!
//! setns(2) moves only the calling thread, so the plugin's main thread never leaves the host
//! namespace: its `/proc/sys/net` writes and its host-side netlink socket always act on the
//! host. Work inside the container runs on a scoped thread that enters the namespace, opens its
//! own netlink socket there (a socket belongs to the namespace it was created in) and ends when
//! the work is done, so no thread is ever handed back to anyone in a foreign namespace.

use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use rtnetlink::Handle;

use super::types::CniError;

/// The calling thread's own network namespace.
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Why a namespace could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The path does not exist.
    #[error("CNI_NETNS: {path} does not exist")]
    Gone {
        /// The path.
        path: PathBuf,
    },
    /// The path cannot be opened.
    #[error("CNI_NETNS: cannot open {path}: {source}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The path is not a network namespace (setns refused it).
    #[error("CNI_NETNS: {path} is not a network namespace: {source}")]
    NotNetns {
        /// The path.
        path: PathBuf,
        /// Why.
        source: nix::Error,
    },
    /// The path is the plugin's (the host's) own namespace.
    #[error("CNI_NETNS: {path} is the host's own network namespace, not a container's")]
    Host {
        /// The path.
        path: PathBuf,
    },
    /// The netlink socket or its runtime could not be set up.
    #[error("netlink: cannot open a socket: {0}")]
    Socket(io::Error),
    /// The namespace thread could not be started.
    #[error("cannot start a thread for the container namespace: {0}")]
    Thread(io::Error),
    /// The namespace thread panicked.
    #[error("the container-namespace thread panicked")]
    Panicked,
}

impl From<NetnsError> for CniError {
    fn from(e: NetnsError) -> Self {
        let code = match e {
            NetnsError::Gone { .. }
            | NetnsError::Open { .. }
            | NetnsError::NotNetns { .. }
            | NetnsError::Host { .. } => CniError::INVALID_NETNS,
            NetnsError::Socket(_) | NetnsError::Thread(_) | NetnsError::Panicked => CniError::NETLINK,
        };
        CniError::new(code, e.to_string())
    }
}

/// An open `CNI_NETNS`.
#[derive(Debug)]
pub struct NetnsFile {
    file: File,
    path: PathBuf,
}

impl NetnsFile {
    /// Opens the namespace at `path` and refuses the host's own (a runtime bug that would put
    /// the pod's interface and default route on the host). Whether it is a network namespace
    /// at all is checked when it is entered.
    ///
    /// # Errors
    /// [`NetnsError::Gone`], [`NetnsError::Open`], [`NetnsError::Host`].
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => NetnsError::Gone { path: path.into() },
            _ => NetnsError::Open { path: path.into(), source },
        })?;
        let meta = file.metadata().map_err(|source| NetnsError::Open { path: path.into(), source })?;
        if let Ok(own) = std::fs::metadata(THREAD_NETNS) {
            if own.dev() == meta.dev() && own.ino() == meta.ino() {
                return Err(NetnsError::Host { path: path.into() });
            }
        }
        Ok(Self { file, path: path.into() })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A netlink connection in the calling thread's namespace, with the single-threaded runtime
/// that drives it.
#[derive(Debug)]
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's current namespace.
    ///
    /// # Errors
    /// [`NetnsError::Socket`].
    pub fn here() -> Result<Self, NetnsError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().map_err(NetnsError::Socket)?;
        let (conn, handle, _) = {
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(NetnsError::Socket)?
        };
        rt.spawn(conn);
        Ok(Self { rt, handle })
    }

    /// The request handle.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `f` (netlink requests) to completion on this connection's runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// Runs `work` on a new thread inside `ns`, with a netlink connection opened there and the
/// namespace the thread came from (the host's) as an open file, for moving an interface back
/// out. Blocks until it is done.
///
/// # Errors
/// [`NetnsError::NotNetns`] if `ns` is not a network namespace, thread or socket failures, or
/// whatever `work` returns.
pub fn run_in<T: Send>(
    ns: &NetnsFile,
    work: impl FnOnce(&Netlink, &File) -> Result<T, CniError> + Send,
) -> Result<T, CniError> {
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("weft-cni-netns".into())
            .spawn_scoped(s, || {
                // Opened before setns: this is the host namespace.
                let host = File::open(THREAD_NETNS).map_err(|e| CniError::from(NetnsError::Socket(e)))?;
                nix::sched::setns(&ns.file, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::NotNetns { path: ns.path.clone(), source })?;
                let nl = Netlink::here()?;
                work(&nl, &host)
            })
            .map_err(NetnsError::Thread)?;
        thread.join().map_err(|_| NetnsError::Panicked)?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_netns_is_gone() {
        let e = NetnsFile::open(Path::new("/nonexistent/weft-test-netns")).unwrap_err();
        assert!(matches!(e, NetnsError::Gone { .. }), "{e}");
        assert_eq!(CniError::from(e).code, CniError::INVALID_NETNS);
    }

    #[test]
    fn own_netns_is_refused() {
        // /proc/self/ns/net from the test thread is the test process's namespace.
        let e = NetnsFile::open(Path::new(THREAD_NETNS)).unwrap_err();
        assert!(matches!(e, NetnsError::Host { .. }), "{e}");
    }

    #[test]
    fn a_regular_file_is_not_a_netns() {
        let Ok(ns) = NetnsFile::open(Path::new("/proc/self/status")) else { return };
        let e = run_in(&ns, |_, _| Ok(())).unwrap_err();
        assert_eq!(e.code, CniError::INVALID_NETNS, "{e}");
    }
}
