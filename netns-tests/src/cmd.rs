//! Running external commands with a deadline, and owning long-running children.
//!
//! Every command a netns test runs goes through here so that none can hang a CI run: one-shot
//! commands are wrapped in coreutils `timeout`, and spawned daemons are stopped on drop.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Deadline for one-shot commands that do not choose their own.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a child gets between SIGTERM and SIGKILL when it is dropped.
pub const KILL_GRACE: Duration = Duration::from_secs(3);

/// Exit code of coreutils `timeout` when the deadline fired.
const TIMEOUT_EXIT: i32 = 124;

/// How often waits poll a child or a condition.
const POLL: Duration = Duration::from_millis(20);

/// The captured result of a finished one-shot command.
#[derive(Clone, Debug)]
pub struct CmdOutput {
    /// The command line as run, for messages.
    pub cmdline: String,
    /// Exit status (of `timeout`, which passes the child's through unless the deadline fired).
    pub status: ExitStatus,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

impl CmdOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Whether the command was killed because it ran past its deadline.
    pub fn timed_out(&self) -> bool {
        self.status.code() == Some(TIMEOUT_EXIT)
    }

    /// Standard output followed by standard error, for searching a message in either.
    pub fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }

    /// Passes the output through if the command succeeded.
    ///
    /// # Errors
    ///
    /// Fails with the command line, status and both streams if the exit status is not 0.
    pub fn ok(self) -> Result<Self> {
        if self.success() { Ok(self) } else { bail!("{self}") }
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let note = if self.timed_out() { " (deadline hit, killed by timeout)" } else { "" };
        write!(
            f,
            "`{}` exited with {}{note}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.cmdline, self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `program args` to completion, killed after `timeout` (SIGTERM, then SIGKILL 2 s later).
///
/// A non-zero exit is not an error here: callers that expect failure (a ping that must not get
/// through) need the output. Use [`CmdOutput::ok`] to require success.
///
/// # Errors
///
/// Fails only if the command cannot be started.
pub fn run(program: &str, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
    let secs = format!("{:.3}", timeout.as_secs_f64());
    let mut full: Vec<&str> = vec!["-k", "2", &secs, program];
    full.extend_from_slice(args);
    let cmdline = cmdline(program, args);
    let out = Command::new("timeout")
        .args(&full)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting `{cmdline}`"))?;
    Ok(CmdOutput {
        cmdline,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Renders a command line for messages, quoting arguments that need it.
pub fn cmdline(program: &str, args: &[&str]) -> String {
    let mut s = program.to_owned();
    for a in args {
        s.push(' ');
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
            s.push('\'');
            s.push_str(&a.replace('\'', r"'\''"));
            s.push('\'');
        } else {
            s.push_str(a);
        }
    }
    s
}

/// Polls `cond` every 20 ms until it returns `Some` or `timeout` passes.
///
/// # Errors
///
/// Propagates the first error from `cond`; returns `Ok(None)` on timeout.
pub fn poll_until<T>(timeout: Duration, mut cond: impl FnMut() -> Result<Option<T>>) -> Result<Option<T>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

/// Sends a signal by name (`TERM`, `HUP`, `KILL`, ...) with `kill(1)`.
///
/// `kill(1)` rather than `libc::kill` keeps this crate free of `unsafe` (`unsafe` lives
/// only in `forwarder::driver`; `tools/check-layering.sh`).
///
/// # Errors
///
/// Fails if `kill` fails, for example because the process is gone.
pub fn send_signal(pid: u32, signal: &str) -> Result<()> {
    let pid = pid.to_string();
    run("kill", &["-s", signal, &pid], Duration::from_secs(5))?.ok().map(|_| ())
}

/// A long-running child process, stopped on drop: SIGTERM, then SIGKILL after [`KILL_GRACE`].
///
/// Signals are only sent while the child has not been reaped, so its pid cannot have been
/// reused by an unrelated process.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    what: String,
    log: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd` with stdin closed, stdout and stderr appended to `log` when given.
    ///
    /// # Errors
    ///
    /// Fails if the log file cannot be created or the command cannot be started.
    pub fn spawn(mut cmd: Command, what: &str, log: Option<&Path>) -> Result<Self> {
        cmd.stdin(Stdio::null());
        if let Some(log) = log {
            let f = File::options()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("opening log {}", log.display()))?;
            let f2 = f.try_clone().context("duplicating log fd")?;
            cmd.stdout(f).stderr(f2);
        }
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(Self { child, what: what.to_owned(), log: log.map(Path::to_path_buf) })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What this child is, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The log file the child writes to, if any.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The exit status if the child has exited (and reaps it), `None` while it runs.
    ///
    /// # Errors
    ///
    /// Fails if `waitpid` fails.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().with_context(|| format!("waiting for {}", self.what))
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Sends `signal` (by name) to the child if it is still running.
    ///
    /// # Errors
    ///
    /// Fails if the child has already exited, or `kill` fails.
    pub fn signal(&mut self, signal: &str) -> Result<()> {
        if let Some(status) = self.try_wait()? {
            bail!("{} already exited with {status}", self.what);
        }
        send_signal(self.pid(), signal)
    }

    /// Waits up to `timeout` for the child to exit.
    ///
    /// # Errors
    ///
    /// Fails if `waitpid` fails; returns `Ok(None)` if the child is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        poll_until(timeout, || self.try_wait())
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    ///
    /// # Errors
    ///
    /// Fails if the child cannot be signalled or waited for.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        send_signal(self.pid(), "TERM")?;
        if let Some(status) = self.wait_timeout(grace)? {
            return Ok(status);
        }
        eprintln!("{} (pid {}) ignored SIGTERM for {grace:?}; sending SIGKILL", self.what, self.pid());
        self.child.kill().with_context(|| format!("killing {}", self.what))?;
        self.child.wait().with_context(|| format!("reaping {}", self.what))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(KILL_GRACE) {
            eprintln!("stopping {}: {e:#}", self.what);
        }
    }
}

/// The last `lines` lines of a text file, or a note saying why there are none.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            let mut out = all[start..].join("\n");
            out.push('\n');
            out
        }
        Err(e) => format!("(cannot read {}: {e})\n", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_quotes_only_when_needed() {
        assert_eq!(cmdline("ping", &["-c", "3", "a b", "it's", ""]), r"ping -c 3 'a b' 'it'\''s' ''");
    }

    #[test]
    fn run_reports_timeout() {
        let out = run("sleep", &["5"], Duration::from_millis(100)).unwrap();
        assert!(out.timed_out(), "{out}");
        assert!(out.clone().ok().is_err());
    }

    #[test]
    fn run_captures_output() {
        let out = run("sh", &["-c", "echo out; echo err >&2"], DEFAULT_TIMEOUT).unwrap().ok().unwrap();
        assert_eq!(out.stdout, "out\n");
        assert_eq!(out.stderr, "err\n");
    }

    #[test]
    fn proc_drop_terminates() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let mut p = Proc::spawn(cmd, "sleep", None).unwrap();
        assert!(p.is_running());
        let status = p.terminate(KILL_GRACE).unwrap();
        assert!(!status.success());
    }
}
