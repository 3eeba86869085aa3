//! Running code inside a named network namespace without moving the whole process there.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, and threads it creates afterwards
//! inherit the namespace. So a fresh thread enters `/run/netns/<name>` and then builds whatever
//! it needs (a tokio runtime, whose workers it spawns, inherits the namespace too). The main
//! thread stays in the root namespace, which matters: the harness's namespace teardown kills
//! every process whose *main* thread is in the namespace, and that must never be the bench.

use std::fs::File;
use std::os::fd::AsFd as _;

use anyhow::{Context, Result, anyhow};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Runs `f` on a new thread inside network namespace `ns` (as created by `ip netns add`) and
/// returns its result.
///
/// # Errors
///
/// Fails if the namespace cannot be entered, `f` fails, or the thread panics.
pub fn run_in<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(&path)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("the thread in {ns} panicked"))?
    })
}

/// Starts `f` on a new thread inside `ns` and returns at once; join the handle for the result.
///
/// # Errors
///
/// Fails only if the thread cannot be spawned; entering the namespace is reported on join.
pub fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<std::thread::JoinHandle<Result<T>>> {
    let path = format!("/run/netns/{ns}");
    std::thread::Builder::new()
        .name(format!("netns-{ns}"))
        .spawn(move || {
            enter(&path)?;
            f()
        })
        .context("spawning a thread")
}

/// Moves the calling thread into the network namespace bound at `path`.
fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
        .with_context(|| format!("setns({path}, CLONE_NEWNET)"))
}
