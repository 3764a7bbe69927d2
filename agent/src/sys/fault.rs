//! Deterministic fault points for crash tests.
//!
//! `IMAGEUPD_FAULT=<point>[:<n>]` aborts the process (like a `kill -9`, no
//! cleanup runs) the `n`-th time (default 1st) execution reaches `<point>`.
//! When `<point>` is one of [`EIO_POINTS`], the `n`-th pass instead fails
//! with `EIO` (an I/O error the caller must handle: tests/write_errors.rs).
//! Unset, a check costs one relaxed atomic load.
//!
//! Two more switches exist for the power-loss test (tests/powerloss.rs) and
//! are **test-only**; nothing in a deployment sets them:
//!
//! * `IMAGEUPD_TEST_POINT_CMD=<program>`: at every fault point run
//!   `<program> <point>` and wait for it, at every point but the per-file
//!   `mid-*` ones (the test marks its block-level write log at each phase
//!   of an apply);
//! * `IMAGEUPD_TEST_UNSAFE_SKIP=presync-syncfs`: skip the `syncfs` before the
//!   swap, which breaks crash safety on purpose: the test's positive control
//!   must then see torn files after a power cut;
//! * `IMAGEUPD_TEST_UNSAFE_SKIP=track-events`: the agent's change tracker
//!   forgets what it heard whenever another process changes the root, so
//!   the tracking test's positive control sees a change the plan missed.

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
    "whole-disk-stream",
];

/// Fault points that fail with `EIO` instead of aborting: a staged file's
/// write, and the `syncfs` before the swap.
pub const EIO_POINTS: &[&str] = &["eio-stage-write", "eio-presync"];

/// The only value `IMAGEUPD_TEST_UNSAFE_SKIP` knows: skip the pre-swap
/// `syncfs` (test-only, unsafe).
pub const SKIP_PRESYNC: &str = "presync-syncfs";

/// The other value `IMAGEUPD_TEST_UNSAFE_SKIP` knows: the agent's change
/// tracker forgets what it heard whenever another process changes the root
/// (test-only; the tracking test's positive control must then see a change
/// the plan missed).
pub const SKIP_TRACK_EVENTS: &str = "track-events";

static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);
static POINT_CMD: OnceLock<Option<std::ffi::OsString>> = OnceLock::new();

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

/// True on the requested pass of the requested point.
fn hit(name: &str) -> bool {
    match target() {
        Some((want, n)) => want == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n,
        None => false,
    }
}

/// Abort here if this point was requested (and run the test's point
/// command, if any).
pub fn point(name: &'static str) {
    run_point_cmd(name);
    if hit(name) {
        eprintln!("imageupd: fault point {name} reached, aborting");
        std::process::abort();
    }
}

/// Fail with `EIO` here if this I/O fault point was requested.
pub fn io_error(name: &'static str) -> std::io::Result<()> {
    if hit(name) {
        eprintln!("imageupd: I/O fault point {name} reached, failing with EIO");
        return Err(rustix::io::Errno::IO.into());
    }
    Ok(())
}

/// Test-only: true when `IMAGEUPD_TEST_UNSAFE_SKIP` names `what` (one of
/// [`SKIP_PRESYNC`], [`SKIP_TRACK_EVENTS`]); logged loudly, since it
/// breaks crash safety or change tracking.
pub fn unsafe_skip(what: &str) -> bool {
    let on = std::env::var("IMAGEUPD_TEST_UNSAFE_SKIP").is_ok_and(|v| v == what);
    if on {
        eprintln!("imageupd: TEST ONLY: skipping {what} (IMAGEUPD_TEST_UNSAFE_SKIP); not safe");
    }
    on
}

/// Test-only: run `$IMAGEUPD_TEST_POINT_CMD <point>` and wait for it. Its
/// failure is reported on stderr and does not stop the apply (the test
/// sees a missing mark).
fn run_point_cmd(name: &str) {
    // Per-file points would mean thousands of commands.
    if name.starts_with("mid-") {
        return;
    }
    let cmd = POINT_CMD.get_or_init(|| std::env::var_os("IMAGEUPD_TEST_POINT_CMD"));
    if let Some(prog) = cmd {
        match std::process::Command::new(prog).arg(name).status() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("imageupd: test point command for {name}: {s}"),
            Err(e) => eprintln!("imageupd: test point command for {name}: {e}"),
        }
    }
}
