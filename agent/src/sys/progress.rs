//! Progress for operators: bars on a TTY, plain lines otherwise (journald);
//! and for programs that drive imageupd, JSON lines on a file descriptor
//! (`--progress-fd N`, as bootc's `--progress-fd`), one object a line:
//!
//! - `{"type":"phase","phase":"staging"}`: the update entered a phase;
//! - `{"type":"bytes","task":"download","bytes":N,"bytes_total":T,"objects":n,"objects_total":t}`:
//!   a task's progress, at its start, at most every [`JSON_EVERY`] and
//!   when it ends (`"done":true`); `objects_total` only when known;
//! - `{"type":"message","message":"…"}`: what a human would read;
//! - `{"type":"result",…}`: the command's outcome, last (written by the
//!   command line).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Least time between two `bytes` lines of one task on the progress fd.
pub const JSON_EVERY: Duration = Duration::from_millis(200);

/// How progress is shown.
#[derive(Clone, Debug)]
pub struct Progress {
    tty: bool,
    quiet: bool,
    json: Option<Arc<JsonSink>>,
}

/// The `--progress-fd` stream.
#[derive(Debug)]
struct JsonSink {
    out: Mutex<std::fs::File>,
    /// A write failed (the reader went away): stop writing, warned once.
    broken: AtomicBool,
}

impl JsonSink {
    fn emit(&self, v: &serde_json::Value) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut line = v.to_string();
        line.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = out.write_all(line.as_bytes()) {
            if !self.broken.swap(true, Ordering::Relaxed) {
                tracing::warn!("--progress-fd: {e}; no more progress lines");
            }
        }
    }
}

impl Progress {
    /// Bars when stderr is a terminal; nothing at all when `quiet`.
    pub fn new(quiet: bool) -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            quiet,
            json: None,
        }
    }

    /// Also write JSON lines to file descriptor `fd` (inherited from the
    /// caller; opened through /proc/self/fd, so a pipe, a file or a socket
    /// all work).
    pub fn with_fd(mut self, fd: Option<u32>) -> Result<Self> {
        if let Some(fd) = fd {
            let path = format!("/proc/self/fd/{fd}");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("--progress-fd {fd}: cannot open {path}"))?;
            self.json = Some(Arc::new(JsonSink {
                out: Mutex::new(f),
                broken: AtomicBool::new(false),
            }));
        }
        Ok(self)
    }

    /// One JSON line on the progress fd, if there is one.
    pub fn event(&self, v: serde_json::Value) {
        if let Some(j) = &self.json {
            j.emit(&v);
        }
    }

    /// The update entered `phase` (progress fd only).
    pub fn phase(&self, phase: &str) {
        self.event(serde_json::json!({"type": "phase", "phase": phase}));
    }

    /// A plain progress line on stderr.
    pub fn line(&self, msg: &str) {
        self.event(serde_json::json!({"type": "message", "message": msg}));
        if !self.quiet {
            eprintln!("imageupd: {msg}");
        }
    }

    /// A byte-counting bar for a task of `total` bytes in `objects` objects.
    pub fn bar_objects(&self, what: &str, total: u64, objects: u64) -> Bar {
        self.make_bar(what, total, Some(objects))
    }

    /// A byte-counting bar.
    pub fn bar(&self, what: &str, total: u64) -> Bar {
        self.make_bar(what, total, None)
    }

    fn make_bar(&self, what: &str, total: u64, objects_total: Option<u64>) -> Bar {
        let pb = if self.tty && !self.quiet && total > 0 {
            let pb = indicatif::ProgressBar::new(total);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg:>12} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            pb.set_message(what.to_string());
            Some(pb)
        } else {
            None
        };
        if !self.tty && !self.quiet && total > 0 {
            eprintln!("imageupd: {what}: {} to process", human_bytes(total));
        }
        let b = Bar {
            pb,
            done: AtomicU64::new(0),
            total,
            what: what.to_string(),
            plain: !self.tty && !self.quiet,
            last_decile: AtomicU64::new(0),
            objects: AtomicU64::new(0),
            objects_total,
            json: self.json.clone(),
            last_json: Mutex::new(Instant::now()),
        };
        b.emit(Tick::Start);
        b
    }
}

/// Why a bar writes a line on the progress fd.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tick {
    Start,
    Step,
    Done,
}

/// A running progress bar (thread-safe).
pub struct Bar {
    pb: Option<indicatif::ProgressBar>,
    done: AtomicU64,
    total: u64,
    what: String,
    plain: bool,
    last_decile: AtomicU64,
    objects: AtomicU64,
    objects_total: Option<u64>,
    json: Option<Arc<JsonSink>>,
    last_json: Mutex<Instant>,
}

impl Bar {
    /// One more object done (its bytes are counted by [`Bar::inc`]).
    pub fn object(&self) {
        self.objects.fetch_add(1, Ordering::Relaxed);
    }

    /// A `bytes` line on the progress fd: at the start and the end, and
    /// in between at most every [`JSON_EVERY`].
    fn emit(&self, tick: Tick) {
        let Some(j) = &self.json else {
            return;
        };
        {
            let mut t = self.last_json.lock().unwrap_or_else(|e| e.into_inner());
            if tick == Tick::Step && t.elapsed() < JSON_EVERY {
                return;
            }
            *t = Instant::now();
        }
        let last = tick == Tick::Done;
        let mut v = serde_json::json!({
            "type": "bytes",
            "task": self.what,
            "bytes": self.done.load(Ordering::Relaxed),
            "bytes_total": self.total,
            "objects": self.objects.load(Ordering::Relaxed),
        });
        if let Some(t) = self.objects_total {
            v["objects_total"] = t.into();
        }
        if last {
            v["done"] = true.into();
        }
        j.emit(&v);
    }

    /// Count `n` more bytes.
    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        self.emit(Tick::Step);
        if let Some(pb) = &self.pb {
            pb.inc(n);
        } else if self.plain && self.total > 0 {
            let decile = done * 10 / self.total;
            let prev = self.last_decile.fetch_max(decile, Ordering::Relaxed);
            if decile > prev && decile < 10 {
                eprintln!("imageupd: {}: {}%", self.what, decile * 10);
            }
        }
    }

    /// Close the bar.
    pub fn finish(&self) {
        self.emit(Tick::Done);
        if let Some(pb) = &self.pb {
            pb.finish_and_clear();
        }
    }
}

/// Bytes in a short human form (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_on_the_progress_fd() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("progress.jsonl");
        let f = std::fs::File::create(&path).unwrap();
        let p = Progress {
            tty: false,
            quiet: true,
            json: Some(Arc::new(JsonSink {
                out: Mutex::new(f),
                broken: AtomicBool::new(false),
            })),
        };
        p.phase("staging");
        let b = p.bar_objects("download", 100, 2);
        b.inc(60);
        b.object();
        b.inc(40);
        b.object();
        b.finish();
        p.line("done");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0],
            serde_json::json!({"type": "phase", "phase": "staging"})
        );
        assert_eq!(lines[1]["type"], "bytes");
        assert_eq!(lines[1]["bytes"], 0);
        assert_eq!(lines[1]["objects_total"], 2);
        let last = &lines[lines.len() - 2];
        assert_eq!(last["bytes"], 100);
        assert_eq!(last["bytes_total"], 100);
        assert_eq!(last["objects"], 2);
        assert_eq!(last["done"], true);
        assert_eq!(lines[lines.len() - 1]["message"], "done");
        // Rate-limited: the two increments within JSON_EVERY gave no line.
        assert_eq!(lines.len(), 4, "{text}");
    }
}
