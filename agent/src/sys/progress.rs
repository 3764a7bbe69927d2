//! Progress for operators: bars on a TTY, plain lines otherwise (journald).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};

/// How progress is shown.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    tty: bool,
    quiet: bool,
}

impl Progress {
    /// Bars when stderr is a terminal; nothing at all when `quiet`.
    pub fn new(quiet: bool) -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            quiet,
        }
    }

    /// A plain progress line on stderr.
    pub fn line(&self, msg: &str) {
        if !self.quiet {
            eprintln!("imageupd: {msg}");
        }
    }

    /// A byte-counting bar.
    pub fn bar(&self, what: &str, total: u64) -> Bar {
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
        Bar {
            pb,
            done: AtomicU64::new(0),
            total,
            what: what.to_string(),
            plain: !self.tty && !self.quiet,
            last_decile: AtomicU64::new(0),
        }
    }
}

/// A running progress bar (thread-safe).
pub struct Bar {
    pb: Option<indicatif::ProgressBar>,
    done: AtomicU64,
    total: u64,
    what: String,
    plain: bool,
    last_decile: AtomicU64,
}

impl Bar {
    /// Count `n` more bytes.
    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
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
