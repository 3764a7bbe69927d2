//! Running commands: the CLI's exit codes, [`Run`] (a command with a time
//! limit) and its [`Out`], `imageupd ARGS…`, shell one-liners, scripts.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_DRIFT: i32 = 3;
pub const EXIT_UNTRUSTED: i32 = 4;
pub const EXIT_PREFLIGHT: i32 = 5;
pub const EXIT_PRE_HOOK: i32 = 6;
pub const EXIT_POST_HOOK: i32 = 7;
pub const EXIT_LOCKED: i32 = 8;
pub const EXIT_SOURCE: i32 = 9;

/// zstd level used by every publish in the tests (speed over ratio).
pub const LEVEL: &str = "3";

/// Default time limit for one imageupd run; a hang fails the test instead of
/// blocking CI.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// The workspace root (the repository).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

/// The imageupd binary built for these tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_imageupd")
}

/// Abbreviate long outputs in panic messages.
pub fn clip(s: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    if lines.len() <= max_lines {
        s.to_string()
    } else {
        let mut out = lines[..max_lines].join("\n");
        out.push_str(&format!("\n... ({} more lines)", lines.len() - max_lines));
        out
    }
}

// ---------------------------------------------------------------------------
// Running commands.

/// The result of one finished process.
pub struct Out {
    /// The command line, for messages.
    pub cmd: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Out {
    /// Exit code, `None` when killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Terminating signal, if any.
    pub fn signal(&self) -> Option<i32> {
        self.status.signal()
    }

    /// Everything about the run, for panic messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}{}\nelapsed: {:.2?}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.cmd,
            match (self.code(), self.signal()) {
                (Some(c), _) => format!("exit code {c}"),
                (None, Some(s)) => format!("killed by signal {s}"),
                _ => "unknown".into(),
            },
            if self.timed_out { " (TIMED OUT, killed)" } else { "" },
            self.elapsed,
            clip(&self.stdout, 200),
            clip(&self.stderr, 200),
        )
    }

    /// Assert the exit code.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Out {
        if self.code() != Some(code) || self.timed_out {
            panic!("expected exit code {code}\n{}", self.describe());
        }
        self
    }

    /// Assert success.
    #[track_caller]
    pub fn expect_ok(self) -> Out {
        self.expect_code(EXIT_OK)
    }

    /// stdout parsed as the single JSON object `--json` promises.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str::<serde_json::Value>(self.stdout.trim()) {
            Ok(v) if v.is_object() => v,
            Ok(_) => panic!("--json output is not a JSON object\n{}", self.describe()),
            Err(e) => panic!(
                "--json output is not one JSON object ({e})\n{}",
                self.describe()
            ),
        }
    }

    /// stdout + stderr, for substring checks on messages.
    pub fn all_output(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A command about to run, with a time limit.
pub struct Run {
    cmd: Command,
    desc: String,
    timeout: Duration,
}

fn quote(s: &OsStr) -> String {
    let t = s.to_string_lossy();
    if !t.is_empty()
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        t.into_owned()
    } else {
        format!("'{}'", t.replace('\'', "'\\''"))
    }
}

impl Run {
    /// Any program.
    pub fn new(program: impl AsRef<OsStr>) -> Run {
        let program = program.as_ref();
        let mut cmd = Command::new(program);
        // Node-side defaults must never leak in from the environment.
        for k in [
            "IMAGEUPD_ROOT",
            "IMAGEUPD_FAULT",
            "IMAGEUPD_SKIP_SPACE_CHECK",
            "OS_CONFIG_FILES",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("LC_ALL", "C");
        Run {
            cmd,
            desc: quote(program),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Run {
        self.desc.push(' ');
        self.desc.push_str(&quote(a.as_ref()));
        self.cmd.arg(a);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self = self.arg(a);
        }
        self
    }

    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Run {
        self.desc = format!(
            "{}={} {}",
            k.as_ref().to_string_lossy(),
            quote(v.as_ref()),
            self.desc
        );
        self.cmd.env(k, v);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Run {
        self.timeout = t;
        self
    }

    /// The command line, for messages.
    pub fn describe(&self) -> &str {
        &self.desc
    }

    /// The underlying command (to spawn and kill it yourself).
    pub fn into_command(self) -> (Command, String) {
        (self.cmd, self.desc)
    }

    /// Run to completion (or the time limit), capturing stdout and stderr.
    pub fn run(mut self) -> Out {
        let start = Instant::now();
        self.cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.desc));
        let mut so = child.stdout.take().expect("piped stdout");
        let mut se = child.stderr.take().expect("piped stderr");
        let t_out = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = so.read_to_end(&mut v);
            v
        });
        let t_err = std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = se.read_to_end(&mut v);
            v
        });
        let mut timed_out = false;
        let status = loop {
            match child.try_wait().expect("waiting for child") {
                Some(s) => break s,
                None if start.elapsed() > self.timeout => {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait().expect("waiting for killed child");
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        Out {
            cmd: self.desc,
            status,
            stdout,
            stderr,
            elapsed: start.elapsed(),
            timed_out,
        }
    }

    #[track_caller]
    pub fn ok(self) -> Out {
        self.run().expect_ok()
    }

    #[track_caller]
    pub fn code(self, code: i32) -> Out {
        self.run().expect_code(code)
    }
}

/// `imageupd ARGS...`
pub fn imageupd<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Run::new(bin()).args(args)
}

/// Run a shell command line (bash -c), panic unless it succeeds, return stdout.
#[track_caller]
pub fn sh(script: &str) -> String {
    Run::new("bash")
        .arg("-c")
        .arg(format!("set -euo pipefail\n{script}"))
        .ok()
        .stdout
}

/// Run a program with arguments, panic unless it succeeds, return stdout.
#[track_caller]
pub fn cmd<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Run::new(program).args(args).ok().stdout
}

/// Write an executable shell script.
pub fn write_script(path: &Path, body: &str) {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).expect("create script dir");
    }
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod script");
}

/// A process in the background with its output collected.
pub struct Bg {
    pub child: Child,
    desc: String,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
}

impl Bg {
    #[track_caller]
    pub fn spawn(run: Run) -> Bg {
        let (mut c, desc) = run.into_command();
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let collect = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = String::new();
                let _ = r.read_to_string(&mut v);
                v
            })
        };
        let out = collect(Box::new(child.stdout.take().expect("stdout")));
        let err = collect(Box::new(child.stderr.take().expect("stderr")));
        Bg {
            child,
            desc,
            out,
            err,
        }
    }

    /// Wait (at most 240 s) for the exit; status, stdout, stderr.
    #[track_caller]
    pub fn wait(mut self) -> (std::process::ExitStatus, String, String) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(240) {
                let _ = self.child.kill();
                panic!("{} did not finish within 240 s", self.desc);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (
            status,
            self.out.join().unwrap_or_default(),
            self.err.join().unwrap_or_default(),
        )
    }
}
