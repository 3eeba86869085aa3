//! An RAII network namespace: created with `ip netns add`, deleted (with everything running in
//! it) on drop.
//!
//! Names carry the test process's pid, `wt<pid>-<test>-<node>`, as wireguard-go's netns tests
//! do, so a later run can tell a leftover of a killed run (pid gone) from a namespace that a
//! concurrent run still uses.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cmd::{self, CmdOutput, DEFAULT_TIMEOUT, Proc};

/// Prefix of every namespace this harness creates.
pub const PREFIX: &str = "wt";

/// How long processes left in a namespace get between SIGTERM and SIGKILL at teardown.
const TEARDOWN_GRACE: Duration = Duration::from_secs(2);

/// Deadline for the `ip` commands that manage namespaces.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// A network namespace owned by the test; `Drop` kills what runs in it and deletes it.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name`, first removing a leftover of the same name.
    ///
    /// # Errors
    ///
    /// Fails if `ip netns add` fails.
    pub fn create(name: &str) -> Result<Self> {
        if list()?.iter().any(|n| n == name) {
            eprintln!("removing leftover namespace {name}");
            remove(name, "KILL")?;
        }
        cmd::run("ip", &["netns", "add", name], IP_TIMEOUT)?.ok()?;
        let ns = Self { name: name.to_owned() };
        ns.exec_ok("ip", &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program args` inside the namespace with the default 30 s deadline.
    ///
    /// # Errors
    ///
    /// Fails only if the command cannot be started; check [`CmdOutput::success`].
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<CmdOutput> {
        self.exec_timeout(DEFAULT_TIMEOUT, program, args)
    }

    /// Runs `program args` inside the namespace, killed after `timeout`.
    ///
    /// # Errors
    ///
    /// Fails only if the command cannot be started; check [`CmdOutput::success`].
    pub fn exec_timeout(&self, timeout: Duration, program: &str, args: &[&str]) -> Result<CmdOutput> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        let mut out = cmd::run("ip", &full, timeout)?;
        out.cmdline = format!("[{}] {}", self.name, cmd::cmdline(program, args));
        Ok(out)
    }

    /// Runs `program args` inside the namespace and requires exit status 0.
    ///
    /// # Errors
    ///
    /// Fails with the command's output if it exits non-zero or times out.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Result<CmdOutput> {
        self.exec(program, args)?.ok()
    }

    /// A [`Command`] that runs `program args` inside the namespace, for callers that need
    /// their own stdio setup before handing it to [`Proc::spawn`].
    ///
    /// `ip netns exec` execs the program in place (no fork), so the child's pid is the
    /// program's own pid and signals reach it directly.
    pub fn command(&self, program: impl AsRef<Path>, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program.as_ref()).args(args);
        c
    }

    /// Starts a long-running `program args` in the namespace, output appended to `log`.
    ///
    /// The returned [`Proc`] stops the child on drop; dropping the namespace also kills
    /// anything still running in it.
    ///
    /// # Errors
    ///
    /// Fails if the log cannot be opened or the program cannot be started.
    pub fn spawn(&self, program: impl AsRef<Path>, args: &[&str], log: &Path) -> Result<Proc> {
        let what = format!("[{}] {}", self.name, cmd::cmdline(&program.as_ref().display().to_string(), args));
        Proc::spawn(self.command(program, args), &what, Some(log))
    }

    /// The pids of all processes whose network namespace is this one.
    ///
    /// # Errors
    ///
    /// Fails if `ip netns pids` fails.
    pub fn pids(&self) -> Result<Vec<u32>> {
        pids(&self.name)
    }

    /// Whether interface `ifname` exists in the namespace.
    ///
    /// # Errors
    ///
    /// Fails if `ip` cannot be run.
    pub fn has_link(&self, ifname: &str) -> Result<bool> {
        Ok(self.exec("ip", &["link", "show", "dev", ifname])?.success())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = remove(&self.name, "TERM") {
            eprintln!("deleting namespace {}: {e:#}", self.name);
        }
    }
}

/// Builds the namespace name `wt<pid>-<test>-<node>` for this process.
///
/// `test` is reduced to `[A-Za-z0-9_]` and at most 16 characters so names stay readable in
/// `ip netns list`.
pub fn ns_name(test: &str, node: &str) -> String {
    format!("{PREFIX}{}-{}-{node}", std::process::id(), sanitize(test))
}

/// Reduces a test name to `[A-Za-z0-9_]`, at most 16 characters.
pub fn sanitize(test: &str) -> String {
    test.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).take(16).collect()
}

/// A per-test scratch directory `/tmp/wt<pid>-<test>` (configs, logs, captures), created empty.
///
/// # Errors
///
/// Fails if the directory cannot be created.
pub fn scratch_dir(test: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{PREFIX}{}-{}", std::process::id(), sanitize(test)));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Names of all network namespaces, from `ip netns list`.
///
/// # Errors
///
/// Fails if `ip netns list` fails.
pub fn list() -> Result<Vec<String>> {
    let out = cmd::run("ip", &["netns", "list"], IP_TIMEOUT)?.ok()?;
    // Lines look like "name (id: 3)" or just "name".
    Ok(out.stdout.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect())
}

/// Removes `wt<pid>-*` namespaces left by test processes that no longer run.
///
/// Their processes are killed with SIGKILL: a run that was itself SIGKILLed cannot have cleaned
/// up, and its daemons would otherwise hold the namespace (and the CPU) forever. A namespace
/// whose pid has been reused by an unrelated process is left alone; it goes on a later run.
///
/// # Errors
///
/// Fails if namespaces cannot be listed or a stale one cannot be deleted.
pub fn sweep_stale() -> Result<()> {
    let me = std::process::id();
    for name in list()? {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid != me && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale namespace {name} (pid {pid} is gone)");
            remove(&name, "KILL")?;
        }
    }
    Ok(())
}

/// The pid in a `wt<pid>-...` name, or `None` if `name` is not one of ours.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// The pids in namespace `name`.
fn pids(name: &str) -> Result<Vec<u32>> {
    let out = cmd::run("ip", &["netns", "pids", name], IP_TIMEOUT)?.ok()?;
    out.stdout.split_whitespace().map(|p| p.parse().with_context(|| format!("bad pid {p:?}"))).collect()
}

/// Kills everything in namespace `name` (`signal` first, SIGKILL for stragglers) and deletes it.
fn remove(name: &str, signal: &str) -> Result<()> {
    // A namespace lives as long as a process is in it, so `ip netns del` alone would leak it.
    let mut left = pids(name)?;
    if !left.is_empty() {
        for pid in &left {
            // The process may exit between listing and signalling; that is fine.
            let _ = cmd::send_signal(*pid, signal);
        }
        let mut waited = Duration::ZERO;
        while !left.is_empty() && waited < TEARDOWN_GRACE {
            thread::sleep(Duration::from_millis(50));
            waited += Duration::from_millis(50);
            left = pids(name)?;
        }
        for pid in &left {
            eprintln!("pid {pid} still in namespace {name}; sending SIGKILL");
            let _ = cmd::send_signal(*pid, "KILL");
        }
    }
    let out = cmd::run("ip", &["netns", "del", name], IP_TIMEOUT)?;
    if !out.success() && list()?.iter().any(|n| n == name) {
        bail!("{out}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("wt123-ping-n1"), Some(123));
        assert_eq!(owner_pid("wt123-x"), Some(123));
        assert_eq!(owner_pid("wtx-ping-n1"), None);
        assert_eq!(owner_pid("weft-lab-n1"), None);
        assert_eq!(owner_pid("wt123"), None);
    }

    #[test]
    fn names_are_sanitized_and_short() {
        assert_eq!(sanitize("drops non-peer/foreign"), "drops_non_peer_f");
        let n = ns_name("ping", "n1");
        assert!(n.starts_with("wt") && n.ends_with("-ping-n1"), "{n}");
    }
}
