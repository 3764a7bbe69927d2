//! Operator hooks: a run-parts runner for `<root>/etc/imageupd/hooks/*.d/`
//! (SPEC §7).
//!
//! Selection follows dib-run-parts, which TripleO operators already know:
//! only names matching `^[0-9A-Za-z_-]+$` run (so editor backups, `.rpmnew`
//! files and READMEs never run by accident), in `LC_ALL=C sort -n` order.
//! Each hook runs in its own process group, so a timeout can kill everything
//! it started, not just the shell at its top.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{access, AccessFlags, Pid};

mod order;
mod output;
pub use order::order_hook_names;
use output::{drain, spawn_reader, tail_of};

/// Where hooks live, relative to the root being updated.
pub const HOOKS_SUBDIR: &str = "etc/imageupd/hooks";

/// The pattern a hook's file name must match to run (as in dib-run-parts).
pub const HOOK_NAME_PATTERN: &str = "^[0-9A-Za-z_-]+$";

/// Reason reported for names that do not match [`HOOK_NAME_PATTERN`].
pub const SKIP_BAD_NAME: &str = "name does not match ^[0-9A-Za-z_-]+$";

/// Reason reported for files without execute permission.
pub const SKIP_NOT_EXECUTABLE: &str = "not executable";

/// Reason reported for entries whose type cannot be read (e.g. a dangling
/// symlink).
pub const SKIP_UNREADABLE: &str = "cannot stat it (dangling symlink?)";

/// Most stderr retained per hook, in bytes (64 KiB). Bounds memory for a hook
/// that floods its output; every line is logged anyway as it arrives.
pub const MAX_CAPTURE_BYTES: usize = 64 * 1024;

/// Most lines of stderr carried in a [`HookError`], in lines.
pub const STDERR_TAIL_LINES: usize = 20;

/// Most bytes of stderr carried in a [`HookError`], in bytes (4 KiB), so one
/// huge line cannot blow up a status report.
pub const STDERR_TAIL_MAX_BYTES: usize = 4 * 1024;

/// Longest line logged as one record, in bytes (4 KiB); longer lines are
/// split so a hook without newlines cannot grow a buffer without bound.
pub const MAX_LOG_LINE_BYTES: usize = 4 * 1024;

/// How long to keep reading a hook's output after it exited, in milliseconds.
/// Output only stays open this long when the hook left a background process
/// holding its stdout/stderr; waiting the whole timeout for that would add to
/// the quiesce window, so we stop listening and let the process be.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(500);

/// Longest sleep between two checks for a hook's exit, in milliseconds.
/// Polling (rather than a waiter thread) means the hook is never reaped before
/// a timeout kill, so its process-group id cannot have been reused.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The hook directories, one per point of the update where hooks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookPhase {
    /// Before the swap: stop services (SPEC §5 step 5).
    PreApply,
    /// After the swap: start services again (SPEC §5 step 7).
    PostApply,
    /// After a failed pre-apply phase: bring services back without a swap.
    Abort,
    /// Just before a reboot the kernel policy asked for.
    PreReboot,
}

impl HookPhase {
    /// Every phase, in lifecycle order.
    pub const ALL: [HookPhase; 4] = [
        HookPhase::PreApply,
        HookPhase::PostApply,
        HookPhase::Abort,
        HookPhase::PreReboot,
    ];

    /// The phase's name, e.g. `pre-apply`.
    pub fn as_str(self) -> &'static str {
        match self {
            HookPhase::PreApply => "pre-apply",
            HookPhase::PostApply => "post-apply",
            HookPhase::Abort => "abort",
            HookPhase::PreReboot => "pre-reboot",
        }
    }

    /// The phase's directory under the hooks directory, e.g. `pre-apply.d`.
    pub fn dir_name(self) -> &'static str {
        match self {
            HookPhase::PreApply => "pre-apply.d",
            HookPhase::PostApply => "post-apply.d",
            HookPhase::Abort => "abort.d",
            HookPhase::PreReboot => "pre-reboot.d",
        }
    }
}

impl fmt::Display for HookPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a hook is told about the update, through its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookEnv {
    /// The root being updated (`IMAGEUPD_ROOT`).
    pub root: PathBuf,
    /// The current image id, if the root has one (`IMAGEUPD_FROM`, empty
    /// when none).
    pub from: Option<String>,
    /// The target image id (`IMAGEUPD_TO`).
    pub to: String,
    /// Path of the plan's JSON (`IMAGEUPD_PLAN`).
    pub plan_path: PathBuf,
    /// Whether the target kernel differs from the running one
    /// (`IMAGEUPD_KERNEL_CHANGED`, `0` or `1`).
    pub kernel_changed: bool,
}

impl HookEnv {
    /// The variables added to the inherited environment, in a fixed order.
    pub fn vars(&self) -> Vec<(&'static str, OsString)> {
        vec![
            ("IMAGEUPD_ROOT", self.root.clone().into_os_string()),
            (
                "IMAGEUPD_FROM",
                OsString::from(self.from.clone().unwrap_or_default()),
            ),
            ("IMAGEUPD_TO", OsString::from(&self.to)),
            ("IMAGEUPD_PLAN", self.plan_path.clone().into_os_string()),
            (
                "IMAGEUPD_KERNEL_CHANGED",
                OsString::from(if self.kernel_changed { "1" } else { "0" }),
            ),
        ]
    }
}

/// A hook that ran and succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// The hook's file name.
    pub name: String,
    /// Wall-clock time from spawn to exit.
    pub duration: Duration,
    /// Its exit status (always 0: a failing hook is a [`HookError`]).
    pub status_code: i32,
}

/// Why a phase's hooks did not all succeed. The first failure stops the
/// phase; hooks after it do not run.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// A hook exited non-zero or was killed by a signal.
    #[error(
        "{phase} hook {} failed: {}; later {phase} hooks were not run{}",
        .hook.display(),
        describe_exit(*.code, *.signal),
        tail_suffix(.stderr_tail)
    )]
    Failed {
        /// The phase whose hooks were running.
        phase: HookPhase,
        /// Full path of the failing hook.
        hook: PathBuf,
        /// Exit code, or `None` when killed by a signal.
        code: Option<i32>,
        /// The signal that killed it, when `code` is `None`.
        signal: Option<i32>,
        /// The last lines of its stderr (at most [`STDERR_TAIL_LINES`]).
        stderr_tail: String,
    },
    /// A hook ran longer than the timeout; it and its process group were
    /// killed with SIGKILL.
    #[error(
        "{phase} hook {} did not finish within {timeout:?} and was killed with its process group; later {phase} hooks were not run (make it faster or raise the hook timeout){}",
        .hook.display(),
        tail_suffix(.stderr_tail)
    )]
    TimedOut {
        /// The phase whose hooks were running.
        phase: HookPhase,
        /// Full path of the hook.
        hook: PathBuf,
        /// The timeout it exceeded.
        timeout: Duration,
        /// The last lines of its stderr (at most [`STDERR_TAIL_LINES`]).
        stderr_tail: String,
    },
    /// A hook could not be started or waited for.
    #[error(
        "{phase} hook {} could not be run: {source} (is it a valid executable, with a #! line if it is a script?); later {phase} hooks were not run",
        .hook.display()
    )]
    Io {
        /// The phase whose hooks were running.
        phase: HookPhase,
        /// Full path of the hook.
        hook: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The phase's hook directory exists but cannot be listed.
    #[error("cannot list {phase} hooks in {}: {source}; no {phase} hooks were run", .dir.display())]
    ReadDir {
        /// The phase whose hooks were to run.
        phase: HookPhase,
        /// The phase's directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

impl HookError {
    /// The phase the error happened in.
    pub fn phase(&self) -> HookPhase {
        match self {
            HookError::Failed { phase, .. }
            | HookError::TimedOut { phase, .. }
            | HookError::Io { phase, .. }
            | HookError::ReadDir { phase, .. } => *phase,
        }
    }
}

/// Words for a failed hook's exit, e.g. "exited with status 3" or
/// "was killed by signal SIGKILL (9)".
fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {} ({sig})", s.as_str()),
            Err(_) => format!("was killed by signal {sig}"),
        },
        (None, None) => "ended without an exit status".to_owned(),
    }
}

/// The stderr part of an error message.
fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        "; it wrote nothing to stderr".to_owned()
    } else {
        format!("; last lines of its stderr:\n{tail}")
    }
}

/// Runs the hooks of one phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRunner {
    /// The directory holding the `*.d` phase directories, e.g.
    /// `<root>/etc/imageupd/hooks`.
    pub hooks_dir: PathBuf,
    /// How long each hook may run (per hook, not per phase).
    pub timeout: Duration,
}

impl HookRunner {
    /// A runner for the hooks of `root` (`<root>/etc/imageupd/hooks`).
    pub fn for_root(root: &Path, timeout: Duration) -> Self {
        HookRunner {
            hooks_dir: root.join(HOOKS_SUBDIR),
            timeout,
        }
    }

    /// The directory of `phase`'s hooks.
    pub fn phase_dir(&self, phase: HookPhase) -> PathBuf {
        self.hooks_dir.join(phase.dir_name())
    }

    /// True when any of `phases` has a hook to run (or its directory cannot
    /// be read, which running it will report).
    pub fn any(&self, phases: &[HookPhase]) -> bool {
        phases
            .iter()
            .any(|&p| self.select(p).map_or(true, |h| !h.is_empty()))
    }

    /// Lists the hooks `phase` would run, in order, as full paths, warning
    /// about each skipped entry. A missing directory means no hooks.
    pub fn select(&self, phase: HookPhase) -> Result<Vec<PathBuf>, HookError> {
        let dir = self.phase_dir(phase);
        let read_dir_err = |source| HookError::ReadDir {
            phase,
            dir: dir.clone(),
            source,
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(read_dir_err(e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(read_dir_err)?;
            let path = entry.path();
            // Follow symlinks, as dib-run-parts' `find -xtype f` does, so a
            // hook may be a link into a shared library of hooks.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => {}
                Err(_) => {
                    warn_skip(phase, &entry.file_name().to_string_lossy(), SKIP_UNREADABLE);
                    continue;
                }
            }
            match entry.file_name().into_string() {
                Ok(name) => names.push(name),
                // Not UTF-8, so it cannot match the pattern either.
                Err(raw) => warn_skip(phase, &raw.to_string_lossy(), SKIP_BAD_NAME),
            }
        }
        let (ordered, skipped) = order_hook_names(names);
        for (name, why) in &skipped {
            warn_skip(phase, name, why);
        }
        let mut run = Vec::with_capacity(ordered.len());
        for name in ordered {
            let path = dir.join(&name);
            // access(2) rather than mode bits: it is the check behind
            // dib-run-parts' `find -executable`, and it honours ACLs.
            if access(&path, AccessFlags::X_OK).is_ok() {
                run.push(path);
            } else {
                warn_skip(phase, &name, SKIP_NOT_EXECUTABLE);
            }
        }
        Ok(run)
    }

    /// Runs `phase`'s hooks one after the other, stopping at the first that
    /// fails or times out. A missing phase directory means no hooks:
    /// `Ok(vec![])`.
    pub fn run(&self, phase: HookPhase, env: &HookEnv) -> Result<Vec<HookOutcome>, HookError> {
        let hooks = self.select(phase)?;
        let vars = env.vars();
        let mut outcomes = Vec::with_capacity(hooks.len());
        for hook in hooks {
            let outcome = self.run_one(phase, &hook, &vars)?;
            tracing::info!(
                phase = phase.as_str(),
                hook = outcome.name.as_str(),
                duration_ms = u64::try_from(outcome.duration.as_millis()).unwrap_or(u64::MAX),
                "hook succeeded"
            );
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    fn run_one(
        &self,
        phase: HookPhase,
        hook: &Path,
        vars: &[(&'static str, OsString)],
    ) -> Result<HookOutcome, HookError> {
        let name = hook
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let io_err = |source| HookError::Io {
            phase,
            hook: hook.to_owned(),
            source,
        };
        tracing::info!(phase = phase.as_str(), hook = name.as_str(), "running hook");
        let start = Instant::now();
        let mut child = Command::new(hook)
            .envs(vars.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(io_err)?;

        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = mpsc::channel();
        let mut readers = 0;
        if let Some(out) = child.stdout.take() {
            spawn_reader(out, phase, &name, "stdout", None, done_tx.clone());
            readers += 1;
        }
        if let Some(err) = child.stderr.take() {
            let tail = Some(Arc::clone(&stderr_tail));
            spawn_reader(err, phase, &name, "stderr", tail, done_tx.clone());
            readers += 1;
        }
        drop(done_tx);

        let deadline = start + self.timeout;
        let status = match wait_until(&mut child, deadline) {
            Ok(status) => status,
            Err(e) => {
                kill_group(&child);
                let _ = child.wait();
                return Err(io_err(e));
            }
        };
        let duration = start.elapsed();
        let Some(status) = status else {
            kill_group(&child);
            // Reaped only after the kill, so the group id was still ours.
            let _ = child.wait();
            drain(&done_rx, readers, phase, &name);
            return Err(HookError::TimedOut {
                phase,
                hook: hook.to_owned(),
                timeout: self.timeout,
                stderr_tail: tail_of(&stderr_tail),
            });
        };
        drain(&done_rx, readers, phase, &name);
        if status.success() {
            return Ok(HookOutcome {
                name,
                duration,
                status_code: 0,
            });
        }
        Err(failed(phase, hook, status, tail_of(&stderr_tail)))
    }
}

fn warn_skip(phase: HookPhase, name: &str, why: &str) {
    tracing::warn!(
        phase = phase.as_str(),
        "skipping hook {}/{name}: {why}",
        phase.dir_name()
    );
}

fn failed(phase: HookPhase, hook: &Path, status: ExitStatus, stderr_tail: String) -> HookError {
    HookError::Failed {
        phase,
        hook: hook.to_owned(),
        code: status.code(),
        signal: status.signal(),
        stderr_tail,
    }
}

/// Waits for `child` to exit, until `deadline`. `Ok(None)` means it is still
/// running (and not reaped).
fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    // Start fast so short hooks cost little, back off for long ones.
    let mut interval = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(MAX_POLL_INTERVAL);
    }
}

/// SIGKILLs the process group led by `child`, i.e. the hook and everything it
/// started that did not move to another group.
fn kill_group(child: &Child) {
    let Ok(pid) = i32::try_from(child.id()) else {
        return;
    };
    match killpg(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pid, "cannot kill hook process group: {e}"),
    }
}

#[cfg(test)]
mod tests;
