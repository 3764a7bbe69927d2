//! Downgrade protection and node roles (issue 13): an older, validly signed
//! image named by `apply --id` or by the metadata is refused (exit 4, root
//! byte-identical by the oracles and a full snapshot), and installed only
//! on the operator's local word (`--allow-downgrade`, `imageupd rollback`);
//! an image signed for another `compatible` role is refused whatever the
//! flags; `publish` refuses a release that does not increase.
//!
//! Every refusal has its positive control in the same test: the same image
//! with the local flag (or the matching role) is applied.

mod common;

use std::path::PathBuf;

use common::*;

/// A private store holding s1 (release 1) and s2 (release 2, `--parent s1`),
/// signed, and a node root at s2 (so its high-water mark is 2).
struct Node {
    _s: Scratch,
    dir: PathBuf,
    store: PathBuf,
    key: Key,
    root: PathBuf,
    s2: PathBuf,
    before: Tree,
}

impl Node {
    #[track_caller]
    fn new(name: &str) -> Node {
        let s = scratch(name);
        let dir = s.path().to_path_buf();
        let key = keygen(&dir.join("keys"), "publisher");
        let store = dir.join("store");
        let (t1, t2) = synthetic();
        let p1 = imageupd(["publish", "--store"])
            .arg(&store)
            .args(["--id", "s1", "--level", "3", "--key"])
            .arg(&key.secret)
            .arg(t1)
            .ok();
        let p2 = imageupd(["publish", "--json", "--store"])
            .arg(&store)
            .args(["--id", "s2", "--parent", "s1", "--level", "3", "--key"])
            .arg(&key.secret)
            .arg(t2)
            .ok();
        assert!(
            p1.stdout.contains("release 1 on channel default"),
            "{}",
            p1.describe()
        );
        assert_eq!(p2.json()["release"], 2, "{}", p2.describe());
        let root = dir.join("root");
        make_root(t2, &root, &key);
        apply(&store, "s2", &root, &[]).expect_ok();
        let before = snapshot_root(&root);
        Node {
            _s: s,
            dir,
            store,
            key,
            root,
            s2: t2.clone(),
            before,
        }
    }

    #[track_caller]
    fn assert_untouched(&self, context: &str) {
        assert_unchanged(&self.root, &self.before, context);
        assert_converged(&self.s2, &self.root, context);
        assert_eq!(image_id(&self.root).as_deref(), Some("s2"), "{context}");
    }

    /// Write the node's config; the snapshot then includes it.
    fn config(&mut self, toml: &str) {
        write_config(&self.root, toml);
        self.before = snapshot_root(&self.root);
    }

    fn mark(&self) -> serde_json::Value {
        let b = std::fs::read(self.root.join("var/lib/imageupd/releases.json"))
            .expect("the node keeps var/lib/imageupd/releases.json");
        serde_json::from_slice(&b).expect("releases.json is JSON")
    }
}

#[track_caller]
fn expect_refused(out: &Out, needle: &str, context: &str) {
    assert_eq!(
        out.code(),
        Some(EXIT_UNTRUSTED),
        "{context}\n{}",
        out.describe()
    );
    assert!(
        out.all_output().contains(needle),
        "{context}: the message must say {needle:?}\n{}",
        out.describe()
    );
}

#[test]
fn older_release_by_id_is_refused_unless_allowed_locally() {
    let n = Node::new("trust-downgrade-id");
    assert_eq!(n.mark()["channels"]["default"]["release"], 2);
    for cmd in ["apply", "plan"] {
        let out = imageupd([cmd, "--from"])
            .arg(&n.store)
            .args(["--id", "s1", "--root"])
            .arg(&n.root)
            .run();
        expect_refused(&out, "refusing a downgrade", cmd);
        n.assert_untouched(&format!("{cmd} --id s1"));
    }
    // Positive control: the operator's local flag installs it; the mark stays.
    let out = apply(&n.store, "s1", &n.root, &["--allow-downgrade"]).expect_ok();
    assert_eq!(out.json()["result"], "applied", "{}", out.describe());
    assert_applied(
        synthetic().0.as_path(),
        &n.root,
        "s1",
        "apply --allow-downgrade",
    );
    assert_eq!(
        n.mark()["channels"]["default"]["release"],
        2,
        "the mark never falls"
    );
    // And forward again without any flag.
    apply(&n.store, "s2", &n.root, &[]).expect_ok();
    assert_applied(&n.s2, &n.root, "s2", "back to s2");
}

#[test]
fn older_release_named_by_metadata_is_refused() {
    let mut n = Node::new("trust-downgrade-md");
    let md = n.dir.join("metadata.json");
    n.config(&format!("[agent]\nmetadata_file = \"{}\"\n", md.display()));
    let store = n.store.display().to_string();
    std::fs::write(
        &md,
        serde_json::json!({"image_id": "s1", "image_source": store}).to_string(),
    )
    .unwrap();
    for extra in [
        &["apply", "--from-metadata"][..],
        &["apply", "--from-metadata", "--download-only"],
    ] {
        let out = imageupd(extra).args(["--root"]).arg(&n.root).run();
        expect_refused(&out, "refusing a downgrade", &format!("{extra:?}"));
        n.assert_untouched(&format!("{extra:?} naming s1"));
    }
    // Control: metadata naming the current release is fine (nothing to do).
    std::fs::write(
        &md,
        serde_json::json!({"image_id": "s2", "image_source": store}).to_string(),
    )
    .unwrap();
    imageupd(["apply", "--from-metadata", "--root"])
        .arg(&n.root)
        .ok();
    n.assert_untouched("metadata naming s2");
}

#[test]
fn rollback_is_local_intent() {
    let n = Node::new("trust-rollback");
    // The node must have s1 as its previous image: go s1 -> s2 for real.
    apply(&n.store, "s1", &n.root, &["--allow-downgrade"]).expect_ok();
    apply(&n.store, "s2", &n.root, &[]).expect_ok();
    let out = imageupd(["rollback", "--root"]).arg(&n.root).run();
    assert_eq!(out.code(), Some(EXIT_OK), "{}", out.describe());
    assert_applied(synthetic().0.as_path(), &n.root, "s1", "rollback");
    assert_eq!(n.mark()["channels"]["default"]["release"], 2);
}

#[test]
fn image_for_another_role_is_refused() {
    let mut n = Node::new("trust-compatible");
    n.config("compatible = \"compute-x86_64\"\n");
    let (_, t2) = synthetic();
    for (id, role) in [
        ("s3-storage", "storage-x86_64"),
        ("s3-compute", "compute-x86_64"),
    ] {
        imageupd(["publish", "--store"])
            .arg(&n.store)
            .args(["--id", id, "--compatible", role, "--level", "3", "--key"])
            .arg(&n.key.secret)
            .arg(t2)
            .ok();
    }
    for extra in [&[][..], &["--allow-downgrade"]] {
        let out = apply(&n.store, "s3-storage", &n.root, extra);
        expect_refused(&out, "storage-x86_64", "another role");
        n.assert_untouched("image for another role");
    }
    // An image without a role is refused by a node that has one.
    let out = apply(&n.store, "s1", &n.root, &["--allow-downgrade"]);
    expect_refused(&out, "no role", "image without a role");
    n.assert_untouched("image without a role");
    // Positive control: the matching role is applied (same tree: adopted).
    let out = apply(&n.store, "s3-compute", &n.root, &[]).expect_ok();
    assert_eq!(
        image_id(&n.root).as_deref(),
        Some("s3-compute"),
        "{}",
        out.describe()
    );
    assert_eq!(n.mark()["channels"]["default"]["release"], 4);
}

#[test]
fn publish_refuses_a_release_that_does_not_increase() {
    let s = scratch("trust-publish-release");
    let store = s.join("store");
    let (t1, t2) = synthetic();
    imageupd(["publish", "--store"])
        .arg(&store)
        .args(["--id", "a"])
        .arg(t1)
        .ok();
    for bad in ["1", "0"] {
        let out = imageupd(["publish", "--store"])
            .arg(&store)
            .args(["--id", "b", "--release", bad])
            .arg(t2)
            .run();
        assert_eq!(
            out.code(),
            Some(EXIT_USAGE),
            "--release {bad}\n{}",
            out.describe()
        );
        assert!(!store.join("images/b").exists(), "nothing published");
    }
    let out = imageupd(["publish", "--json", "--store"])
        .arg(&store)
        .args(["--id", "b", "--release", "10"])
        .arg(t2)
        .ok();
    assert_eq!(out.json()["release"], 10);
    // Another channel counts on its own.
    let out = imageupd(["publish", "--json", "--store"])
        .arg(&store)
        .args(["--id", "c", "--channel", "beta"])
        .arg(t2)
        .ok();
    assert_eq!(out.json()["release"], 1);
    let m = read_manifest(&store, "b");
    assert_eq!(
        (m["format"].clone(), m["channel"].clone()),
        (2.into(), "default".into())
    );
}
