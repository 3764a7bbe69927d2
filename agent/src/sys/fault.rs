//! Deterministic fault points for crash tests.
//!
//! `IMAGEUPD_FAULT=<point>[:<n>]` aborts the process (like a `kill -9`, no
//! cleanup runs) the `n`-th time (default 1st) execution reaches `<point>`.
//! Unset, a check costs one relaxed atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Every fault point, in the order an apply reaches them.
pub const POINTS: &[&str] = &[
    "after-journal-begin",
    "mid-stage",
    "after-stage",
    "after-presync",
    "mid-swap",
    "after-swap",
    "mid-delete",
    "after-delete",
    "after-image-id",
    "after-dirmeta",
    "before-commit",
    "after-commit",
    "provision-wiped",
    "provision-formatted",
    "provision-applied",
    "provision-fstab",
    "provision-bootloader",
    "provision-configdrive",
    "provision-table",
    "provision-done",
];

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn target() -> &'static Option<(String, u64)> {
    TARGET.get_or_init(|| {
        let v = std::env::var("IMAGEUPD_FAULT").ok()?;
        let (name, n) = match v.split_once(':') {
            Some((a, b)) => (a.to_string(), b.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some((name, n.max(1)))
    })
}

/// Abort here if this point was requested.
pub fn point(name: &'static str) {
    if let Some((want, n)) = target() {
        if want == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n {
            eprintln!("imageupd: fault point {name} reached, aborting");
            std::process::abort();
        }
    }
}
