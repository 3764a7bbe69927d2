//! Scratch nodes: roots made from the fixture trees, `apply` and `verify`
//! on them, and the checks that an update was applied.

use std::path::{Path, PathBuf};

use super::*;

/// `imageupd apply --from SRC --id ID --root ROOT --json` plus EXTRA; the
/// exit code is not checked.
pub fn apply(src: &Path, id: &str, root: &Path, extra: &[&str]) -> Out {
    imageupd(["apply", "--from"])
        .arg(src)
        .args(["--id", id, "--root"])
        .arg(root)
        .arg("--json")
        .args(extra)
        .run()
}

/// Like [`apply`], asserting success and `"result"` == EXPECT_RESULT.
#[track_caller]
pub fn apply_ok(src: &Path, id: &str, root: &Path, expect_result: &str) -> Out {
    let out = apply(src, id, root, &[]).expect_ok();
    let j = out.json();
    assert_eq!(
        j["result"].as_str(),
        Some(expect_result),
        "unexpected apply result\n{}",
        out.describe()
    );
    out
}

/// `imageupd verify --root ROOT [--checksum] --json`; exit code unchecked.
pub fn verify(root: &Path, checksum: bool) -> Out {
    let mut r = imageupd(["verify", "--root"]).arg(root).arg("--json");
    if checksum {
        r = r.arg("--checksum");
    }
    r.run()
}

/// Content of ROOT/etc/image_id, trimmed.
pub fn image_id(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join("etc/image_id"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Assert the full post-apply contract: both oracles clean, `verify
/// --checksum` exit 0, /etc/image_id == ID.
#[track_caller]
pub fn assert_applied(image: &Path, root: &Path, id: &str, context: &str) {
    assert_converged(image, root, context);
    assert_eq!(
        image_id(root).as_deref(),
        Some(id),
        "{context}: /etc/image_id"
    );
    let v = verify(root, true);
    assert_eq!(
        v.code(),
        Some(EXIT_OK),
        "{context}: verify --checksum after apply\n{}",
        v.describe()
    );
}

/// A scratch node root: a copy of TREE that trusts KEY.
#[track_caller]
pub fn make_root(tree: &Path, dst: &Path, key: &Key) {
    copy_tree(tree, dst);
    trust(dst, key);
}

/// A scratch node installed at image ID: a copy of its tree that trusts
/// the store's key, adopted by an apply of ID (so the node's current image,
/// state and /etc/image_id are ID's).
#[track_caller]
pub fn install_root(store: &SharedStore, id: &str, dst: &Path) -> PathBuf {
    let tree = store.image(id);
    make_root(&tree, dst, &store.key);
    let out = apply(&store.dir, id, dst, &[]).expect_ok();
    assert_eq!(
        image_id(dst).as_deref(),
        Some(id),
        "applying {id} to a copy of {id} must record /etc/image_id (adoption)\n{}",
        out.describe()
    );
    tree
}

/// The update s1 -> s2 is committed: /etc/image_id, content only s2 has,
/// and `verify` clean. (For tests whose subject is not the content itself;
/// full convergence is checked by [`assert_applied`] in tests/engine.rs.)
#[track_caller]
pub fn assert_committed_s2(root: &Path, context: &str) {
    assert_eq!(
        image_id(root).as_deref(),
        Some("s2"),
        "{context}: /etc/image_id"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("new/p/one"))
            .ok()
            .as_deref(),
        Some("new 1\n"),
        "{context}: new/p/one"
    );
    assert!(
        root.join("types/file2dir").is_dir(),
        "{context}: types/file2dir is not a directory"
    );
    assert!(!root.join("gone").exists(), "{context}: gone/ still exists");
    let v = verify(root, false);
    assert_eq!(
        v.code(),
        Some(EXIT_OK),
        "{context}: verify after the apply\n{}",
        v.describe()
    );
}

/// A node at ID that imageupd manages already (state directory and all):
/// a copy of ID's tree, adopted by an apply from the shared store.
#[track_caller]
pub fn node_at(id: &str, root: &Path) {
    let store = shared_store();
    make_root(&store.image(id), root, &store.key);
    apply(&store.dir, id, root, &[]).expect_ok();
}

/// [`node_at`] v1.
#[track_caller]
pub fn node_at_v1(root: &Path) {
    node_at("v1", root);
}
