//! An apply on a read-only root: the root is a loop-mounted ext4 that is
//! mounted read-only before the apply, must be read-only again afterwards
//! (checked in /proc/self/mountinfo), and must match the image.

mod common;

use common::*;

#[test]
fn apply_on_readonly_ext4_root() {
    let store = shared_store();
    let v1 = store.image("v1");
    let v2 = store.image("v2");
    let s = scratch("readonly");

    // v1 on its own ext4, trusted key added, then made read-only.
    let fs = LoopFs::create(s.path(), 1024, Some(&v1), false);
    trust(&fs.mnt, &store.key);
    fs.remount(true);
    assert_eq!(fs.readonly(), Some(true), "root must start read-only");
    let before = snapshot_root(&fs.mnt);

    // plan must not need (or leave) a writable root.
    let plan = imageupd(["plan", "--from"])
        .arg(&store.dir)
        .args(["--id", "v2", "--root"])
        .arg(&fs.mnt)
        .arg("--json")
        .ok();
    plan.json();
    assert_eq!(fs.readonly(), Some(true), "plan changed the mount state");
    assert_unchanged(&fs.mnt, &before, "plan on a read-only root");

    let out = apply_ok(&store.dir, "v2", &fs.mnt, "applied");
    eprintln!("apply v1 -> v2 on read-only ext4: {:.2?}", out.elapsed);
    assert_eq!(
        fs.readonly(),
        Some(true),
        "root is not read-only again after apply\n{}",
        out.describe()
    );
    assert_applied(
        &v2,
        &fs.mnt,
        "v2",
        "apply v1 -> v2 on a read-only ext4 root",
    );

    // A no-op apply leaves it read-only too.
    apply_ok(&store.dir, "v2", &fs.mnt, "nothing-to-do");
    assert_eq!(
        fs.readonly(),
        Some(true),
        "root is not read-only after a no-op apply"
    );

    // Back to v1, still read-only afterwards.
    apply_ok(&store.dir, "v1", &fs.mnt, "applied");
    assert_eq!(
        fs.readonly(),
        Some(true),
        "root is not read-only again after apply v2 -> v1"
    );
    assert_applied(
        &v1,
        &fs.mnt,
        "v1",
        "apply v2 -> v1 on a read-only ext4 root",
    );

    // A failed apply (pre-apply hook refuses) leaves the root read-only and
    // unchanged as well.
    fs.remount(false);
    write_script(
        &fs.mnt.join("etc/imageupd/hooks/pre-apply.d/10-refuse"),
        "exit 1",
    );
    fs.remount(true);
    let before = snapshot_root(&fs.mnt);
    let out = apply(&store.dir, "v2", &fs.mnt, &[]);
    assert_eq!(out.code(), Some(EXIT_PRE_HOOK), "{}", out.describe());
    assert_eq!(
        fs.readonly(),
        Some(true),
        "root is not read-only again after a failed apply\n{}",
        out.describe()
    );
    assert_unchanged(&fs.mnt, &before, "failed apply on a read-only root");
}
