//! `imageupd serve` run by a test: started on loopback, its access log in
//! a file, killed when dropped.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::{imageupd, sh};

/// How long a server may take to come up.
const STARTUP: Duration = Duration::from_secs(20);

/// A running `imageupd serve`, killed when dropped.
pub struct Server {
    child: Option<Child>,
    /// Base URL, ending in `/`.
    pub url: String,
    /// Listening address.
    pub addr: SocketAddr,
    /// The line it printed once ready (`listening on URL serving STORE…`).
    pub line: String,
    log: PathBuf,
}

impl Server {
    /// `imageupd serve --store STORE` on an ephemeral loopback port.
    #[track_caller]
    pub fn local(store: &Path, log: &Path) -> Server {
        Server::start(store, "127.0.0.1:0", &[], log)
    }

    /// `imageupd serve` sending each body at 128 KiB/s in 256 KiB frames (the
    /// first at once, the next after a pause): a large object stays half sent
    /// for a while.
    #[track_caller]
    pub fn throttled(store: &Path, log: &Path) -> Server {
        Server::start(
            store,
            "127.0.0.1:0",
            &[OsStr::new("--throttle"), OsStr::new("131072")],
            log,
        )
    }

    /// `imageupd serve --store STORE --listen LISTEN EXTRA...`; stderr (the
    /// access log) goes to LOG.
    #[track_caller]
    pub fn start(store: &Path, listen: &str, extra: &[&OsStr], log: &Path) -> Server {
        let (mut c, desc) = imageupd(["serve", "--store"])
            .arg(store)
            .args(["--listen", listen])
            .args(extra)
            .into_command();
        let logf = std::fs::File::create(log).expect("create server log");
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .env("IMAGEUPD_LOG", "info");
        let mut child = c
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(STARTUP) {
            Ok(l) if l.starts_with("listening on ") => l,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{desc} did not start ({other:?}); log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        };
        let url = line
            .split_whitespace()
            .nth(2)
            .expect("URL in the listening line")
            .to_string();
        let hostport = url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .expect("host:port in URL");
        let addr: SocketAddr = hostport
            .parse()
            .unwrap_or_else(|e| panic!("bad address {hostport}: {e}"));
        Server {
            child: Some(child),
            url,
            addr,
            line: line.trim_end().to_string(),
            log: log.to_path_buf(),
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server still running").id()
    }

    /// The access log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The access log's GET lines so far.
    pub fn gets(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /"))
            .map(str::to_string)
            .collect()
    }

    /// SIGKILL, no grace.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns the exit status once it has exited.
    #[track_caller]
    pub fn term(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server still running");
        sh(&format!("kill -TERM {}", c.id()));
        let t0 = Instant::now();
        loop {
            if let Some(s) = c.try_wait().expect("wait for server") {
                return s;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                panic!("server did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}
