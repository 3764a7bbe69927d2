//! Write errors (issue 13): an I/O error while staging or in the syncfs
//! before the swap must abort the apply before any rename (the root wholly
//! v1, read-only again, the journal "aborted", no staging left), and the
//! next apply must converge to v2.
//!
//! The errors are injected by the agent's I/O fault points
//! (`IMAGEUPD_FAULT=eio-stage-write|eio-presync`, agent/src/sys/fault.rs)
//! on a loop-mounted read-only ext4 root on the host, not by dm-flakey in a
//! guest: the fault point fails the very call whose error the apply must
//! handle, which is the code path under test. Each run also proves the
//! fault fired (its message on stderr), so the test cannot pass vacuously.

mod common;

use common::*;

/// Apply v1 -> v2 with an I/O error at `point`, then converge.
fn eio_aborts_then_converges(point: &str) {
    let store = shared_store();
    let v1 = store.image("v1");
    let v2 = store.image("v2");
    let s = scratch(&format!("eio-{point}"));
    let fs = LoopFs::create(s.path(), 1024, Some(&v1), false);
    trust(&fs.mnt, &store.key);
    apply_ok(&store.dir, "v1", &fs.mnt, "applied");
    fs.remount(true);
    let before = snapshot_root(&fs.mnt);

    let out = imageupd(["apply", "--from"])
        .arg(&store.dir)
        .args(["--id", "v2", "--root"])
        .arg(&fs.mnt)
        .arg("--json")
        .env("IMAGEUPD_FAULT", point)
        .run();
    let ctx = format!("apply v1 -> v2 with IMAGEUPD_FAULT={point}");
    assert!(
        out.stderr
            .contains(&format!("I/O fault point {point} reached")),
        "{ctx}: the fault point did not fire\n{}",
        out.describe()
    );
    assert_eq!(
        out.code(),
        Some(EXIT_ERROR),
        "{ctx}: must fail\n{}",
        out.describe()
    );
    assert!(
        out.all_output().contains("Input/output error"),
        "{ctx}: the error must name the I/O error\n{}",
        out.describe()
    );
    assert!(
        out.all_output().contains("stopped before the swap"),
        "{ctx}: must take the abort path\n{}",
        out.describe()
    );
    // 0 swaps: every path outside the state area is as before, v1.
    assert_unchanged(&fs.mnt, &before, &ctx);
    assert_converged(&v1, &fs.mnt, &ctx);
    assert_eq!(
        fs.readonly(),
        Some(true),
        "{ctx}: the root is not read-only again"
    );
    let j: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fs.mnt.join("var/lib/imageupd/journal.json")).expect("journal.json"),
    )
    .expect("journal.json parses");
    assert_eq!(j["phase"], "aborted", "{ctx}: journal {j}");
    assert!(
        !fs.mnt.join("var/lib/imageupd/stage").exists() && !fs.mnt.join(".imageupd-stage").exists(),
        "{ctx}: staging left behind"
    );

    let again = apply_ok(&store.dir, "v2", &fs.mnt, "applied");
    assert_applied(&v2, &fs.mnt, "v2", &format!("{ctx}, then apply again"));
    assert_eq!(
        fs.readonly(),
        Some(true),
        "{ctx}: not read-only after the re-run\n{}",
        again.describe()
    );
}

#[test]
fn eio_while_staging_aborts_and_resume_converges() {
    eio_aborts_then_converges("eio-stage-write");
}

#[test]
fn eio_in_presync_aborts_and_resume_converges() {
    eio_aborts_then_converges("eio-presync");
}
