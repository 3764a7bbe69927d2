//! Untrusted or impossible input must be refused with the documented exit
//! code, leaving the root byte-identical: checked with both oracles against
//! the image the root was installed from, with a full before/after snapshot
//! of the root (state area var/lib/imageupd/ excluded), and with
//! /etc/image_id.
//!
//! Most cases update an installed synthetic root s1 towards s2 (fast); the
//! free-space cases use the real trees v1 -> v2 on a small ext4.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

/// A node root installed (adopted) at image ID by an apply, with its
/// snapshot taken right after.
struct Installed {
    _s: Scratch,
    dir: PathBuf,
    root: PathBuf,
    image: PathBuf,
    id: String,
    before: Tree,
}

impl Installed {
    #[track_caller]
    fn new(name: &str, id: &str) -> Installed {
        let s = scratch(name);
        let root = s.join("root");
        let image = install_root(shared_store(), id, &root);
        let before = snapshot_root(&root);
        let dir = s.path().to_path_buf();
        Installed {
            _s: s,
            dir,
            root,
            image,
            id: id.to_string(),
            before,
        }
    }

    /// The root is exactly as it was installed.
    #[track_caller]
    fn assert_untouched(&self, context: &str) {
        assert_unchanged(&self.root, &self.before, context);
        assert_converged(&self.image, &self.root, context);
        assert_eq!(
            image_id(&self.root).as_deref(),
            Some(self.id.as_str()),
            "{context}: /etc/image_id changed"
        );
    }

    fn apply(&self, store: &Path, id: &str, extra: &[&str]) -> Out {
        apply(store, id, &self.root, extra)
    }
}

/// Adopt a root that is a copy of image ID: after the apply it is "at" ID.
#[track_caller]
fn install(store: &Path, id: &str, root: &Path) {
    let out = apply(store, id, root, &[]).expect_ok();
    assert_eq!(
        image_id(root).as_deref(),
        Some(id),
        "applying {id} to a copy of {id} must record /etc/image_id (adoption)\n{}",
        out.describe()
    );
}

#[track_caller]
fn expect_refused(out: &Out, code: i32, context: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "{context}: expected exit code {code}\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.trim().is_empty() || !out.stdout.trim().is_empty(),
        "{context}: refused without a message"
    );
}

/// A copy of the shared store (hardlinks; tamper only by replacing files).
fn store_copy(dst: &Path) -> PathBuf {
    let store = shared_store();
    store.image("s1");
    store.image("s2");
    cmd(
        "cp",
        [OsStr::new("-al"), store.dir.as_os_str(), dst.as_os_str()],
    );
    dst.to_path_buf()
}

/// Replace a file without writing through a shared hardlink.
fn replace_file(path: &Path, data: &[u8]) {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp-test");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The object of a file that only s2 has (so the update must fetch it).
fn needed_object(store: &Path, rel: &str) -> (PathBuf, Vec<u8>) {
    let (s1, s2) = synthetic();
    let digest = sha256_file(&s2.join(rel));
    assert!(!s1.join(rel).exists(), "{rel} must be new in s2");
    let obj = object_path(store, &digest);
    assert!(
        obj.is_file(),
        "object {} of {rel} is not in the store",
        obj.display()
    );
    let content = std::fs::read(s2.join(rel)).unwrap();
    (obj, content)
}

#[test]
fn tampered_object_recompressed_is_refused() {
    let node = Installed::new("tamper-recompressed", "s1");
    let st = store_copy(&node.dir.join("store"));
    let (obj, mut content) = needed_object(&st, "new/blob.bin");
    let mid = content.len() / 2;
    content[mid] ^= 0xff;
    replace_file(&obj, &zstd::encode_all(&content[..], 3).unwrap());
    let out = node.apply(&st, "s2", &[]);
    expect_refused(
        &out,
        EXIT_UNTRUSTED,
        "object whose content does not match its digest",
    );
    node.assert_untouched("tampered object (valid zstd, wrong content)");
}

#[test]
fn tampered_object_flipped_byte_is_refused() {
    let node = Installed::new("tamper-flip", "s1");
    let st = store_copy(&node.dir.join("store"));
    let (obj, _) = needed_object(&st, "new/blob.bin");
    let mut raw = std::fs::read(&obj).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x01;
    replace_file(&obj, &raw);
    let out = node.apply(&st, "s2", &[]);
    expect_refused(&out, EXIT_UNTRUSTED, "object with one flipped byte");
    node.assert_untouched("tampered object (flipped byte)");
}

#[test]
fn truncated_object_is_refused() {
    let node = Installed::new("truncated", "s1");
    let st = store_copy(&node.dir.join("store"));
    let (obj, _) = needed_object(&st, "new/blob.bin");
    let raw = std::fs::read(&obj).unwrap();
    replace_file(&obj, &raw[..raw.len() / 2]);
    let out = node.apply(&st, "s2", &[]);
    assert!(
        out.code() == Some(EXIT_UNTRUSTED) || out.code() == Some(EXIT_SOURCE),
        "truncated object: expected exit 4 (digest mismatch) or 9 (unreadable object)\n{}",
        out.describe()
    );
    node.assert_untouched("truncated object");
}

#[test]
fn missing_object_is_a_source_error() {
    let node = Installed::new("missing-object", "s1");
    let st = store_copy(&node.dir.join("store"));
    let (obj, _) = needed_object(&st, "new/blob.bin");
    std::fs::remove_file(&obj).unwrap();
    let out = node.apply(&st, "s2", &[]);
    expect_refused(&out, EXIT_SOURCE, "missing object");
    node.assert_untouched("missing object");
}

fn sig_path(store: &Path, id: &str) -> PathBuf {
    store.join("images").join(id).join("manifest.json.zst.sig")
}

#[test]
fn bad_signature_is_refused() {
    let node = Installed::new("badsig", "s1");
    let st = store_copy(&node.dir.join("store"));
    let sig = sig_path(&st, "s2");
    let mut v: Value =
        serde_json::from_slice(&std::fs::read(&sig).unwrap()).expect("signature file is JSON");
    assert_eq!(v["alg"], "ed25519", "signature file format: {v}");
    // Flip one bit of the signature itself.
    let mut raw = base64_decode(v["sig"].as_str().expect("sig field"));
    raw[10] ^= 0x01;
    v["sig"] = Value::String(base64_encode(&raw));
    replace_file(&sig, &serde_json::to_vec(&v).unwrap());
    let out = node.apply(&st, "s2", &[]);
    expect_refused(&out, EXIT_UNTRUSTED, "bad signature");
    node.assert_untouched("bad signature");

    // A valid signature by a key the node does not trust.
    let other = keygen(&node.dir.join("keys"), "untrusted");
    let m = st.join("images/s2/manifest.json.zst");
    std::fs::remove_file(&sig).unwrap();
    imageupd::format::sign::sign_file(&other.secret, &m).expect("sign with the untrusted key");
    let out = node.apply(&st, "s2", &[]);
    expect_refused(&out, EXIT_UNTRUSTED, "signature by an untrusted key");
    node.assert_untouched("untrusted signer");

    // No signature at all.
    std::fs::remove_file(&sig).unwrap();
    let out = node.apply(&st, "s2", &[]);
    expect_refused(&out, EXIT_UNTRUSTED, "signature file removed");
    node.assert_untouched("signature removed");
}

#[test]
fn unsigned_manifest_needs_explicit_permission() {
    let node = Installed::new("unsigned", "s1");
    let s2 = fixture_tree("s2");
    let st = node.dir.join("unsigned-store");
    publish(&st, "s2", None, None, &s2);
    assert!(
        !sig_path(&st, "s2").exists(),
        "publish without --key wrote a signature"
    );

    let out = node.apply(&st, "s2", &[]);
    expect_refused(
        &out,
        EXIT_UNTRUSTED,
        "unsigned manifest without allow_unsigned",
    );
    node.assert_untouched("unsigned manifest refused");

    // --allow-unsigned accepts it.
    let out = node.apply(&st, "s2", &["--allow-unsigned"]).expect_ok();
    assert_eq!(out.json()["result"], "applied", "{}", out.describe());
    assert_committed_s2(&node.root, "unsigned manifest with --allow-unsigned");

    // So does allow_unsigned = true in the node's config.
    let node2 = Installed::new("unsigned-config", "s1");
    write_config(&node2.root, "allow_unsigned = true\n");
    let out = node2.apply(&st, "s2", &[]).expect_ok();
    assert_eq!(out.json()["result"], "applied", "{}", out.describe());
    assert_committed_s2(&node2.root, "unsigned manifest with allow_unsigned = true");
}

/// Replace the s2 manifest of STORE by MODIFY(manifest), re-signed with the
/// publisher's (trusted) key, so only the content is wrong.
fn craft_manifest(store: &Path, modify: impl FnOnce(&mut Value)) {
    let mut m = read_manifest(store, "s2");
    modify(&mut m);
    let path = store.join("images/s2/manifest.json.zst");
    replace_file(
        &path,
        &zstd::encode_all(&serde_json::to_vec(&m).unwrap()[..], 3).unwrap(),
    );
    let sig = sig_path(store, "s2");
    std::fs::remove_file(&sig).unwrap(); // never write through the hardlink
    imageupd::format::sign::sign_file(&shared_store().key.secret, &path)
        .expect("re-sign the crafted manifest");
}

#[test]
fn unknown_manifest_version_is_refused() {
    let node = Installed::new("version", "s1");
    let st = store_copy(&node.dir.join("store"));
    // Control: the same re-signing of an unmodified manifest is accepted by
    // plan, so the refusal below is about the version only.
    craft_manifest(&st, |_| {});
    imageupd(["plan", "--from"])
        .arg(&st)
        .args(["--id", "s2", "--root"])
        .arg(&node.root)
        .ok();

    craft_manifest(&st, |m| {
        assert_eq!(m["format"], 2, "published manifests are format 2");
        m["format"] = json!(3);
    });
    let out = node.apply(&st, "s2", &[]);
    expect_refused(&out, EXIT_UNTRUSTED, "manifest format 3");
    assert!(
        out.all_output().to_lowercase().contains("version"),
        "the error must name the version problem\n{}",
        out.describe()
    );
    node.assert_untouched("unknown manifest version");
}

/// A file entry of s2 whose object exists, re-pointed at PATH.
fn file_entry_at(m: &Value, path: &str) -> Value {
    let mut e = m["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["path"] == "same/file")
        .expect("same/file entry")
        .clone();
    e["path"] = json!(path);
    e
}

#[test]
fn traversal_paths_in_manifest_are_refused() {
    let node = Installed::new("traversal", "s1");
    let outside = node.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let outside_before = scan(&outside, &|_| false);
    let abs_target = outside.join("absolute-escape");
    shared_store().image("s2");
    let base = read_manifest(&shared_store().dir, "s2");
    let mut link = file_entry_at(&base, "zz-escape");
    let obj = link.as_object_mut().unwrap();
    obj.remove("sha256");
    obj.remove("size");
    obj.remove("xattrs");
    link["type"] = json!("symlink");
    link["target"] = json!(outside.to_string_lossy());
    // Entries appended to an otherwise valid, correctly signed s2 manifest.
    let cases: Vec<(&str, Vec<Value>)> = vec![
        (
            "'..' path",
            vec![file_entry_at(&base, "same/../../outside/dotdot-escape")],
        ),
        (
            "absolute path",
            vec![file_entry_at(&base, &abs_target.to_string_lossy())],
        ),
        (
            "path through a symlink entry",
            vec![link, file_entry_at(&base, "zz-escape/pwned")],
        ),
    ];
    for (what, extra) in cases {
        let st = node
            .dir
            .join(format!("store-{}", what.replace([' ', '\''], "_")));
        store_copy(&st);
        craft_manifest(&st, |m| m["entries"].as_array_mut().unwrap().extend(extra));
        let out = node.apply(&st, "s2", &[]);
        expect_refused(&out, EXIT_UNTRUSTED, &format!("manifest with a {what}"));
        node.assert_untouched(&format!("manifest with a {what}"));
        let d = diff_trees(
            &outside_before,
            &scan(&outside, &|_| false),
            "before",
            "after",
        );
        assert!(
            d.is_empty(),
            "manifest with a {what}: something was written outside the root:\n{}",
            d.join("\n")
        );
        assert!(
            !outside.join("dotdot-escape").exists(),
            "'..' escape written outside the root"
        );
    }
}

#[test]
fn image_directory_replaced_by_symlink_outside_is_refused() {
    let node0 = Installed::new("symlink-outside", "s1");
    let store = shared_store();
    // On the node, the image's directory "hardlinks" (which s2 changes) is
    // a symlink to a directory outside the root; "new" (which s2 adds) is
    // too.
    let outside = node0.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let root = &node0.root;
    std::fs::rename(root.join("hardlinks"), outside.join("hardlinks-real")).unwrap();
    std::os::unix::fs::symlink(outside.join("hardlinks-real"), root.join("hardlinks")).unwrap();
    std::fs::create_dir_all(outside.join("new-real")).unwrap();
    std::os::unix::fs::symlink(outside.join("new-real"), root.join("new")).unwrap();
    let root_before = snapshot_root(root);
    let outside_before = scan(&outside, &|_| false);

    let out = apply(&store.dir, "s2", root, &[]);
    expect_refused(
        &out,
        EXIT_PREFLIGHT,
        "image directory replaced by a symlink pointing outside the root",
    );
    assert_unchanged(root, &root_before, "symlink-outside refusal");
    let d = diff_trees(
        &outside_before,
        &scan(&outside, &|_| false),
        "before",
        "after",
    );
    assert!(
        d.is_empty(),
        "something was written outside the root through the symlink:\n{}",
        d.join("\n")
    );
    assert_eq!(image_id(root).as_deref(), Some("s1"));
}

/// Free space of the filesystem holding PATH, in bytes.
fn avail(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    st.f_bavail * st.f_frsize
}

#[test]
fn enospc_preflight_and_during_staging() {
    let store = shared_store();
    let v1 = store.image("v1");
    store.image("v2");
    let s = scratch("enospc");
    let fs = LoopFs::create(s.path(), 512, Some(&v1), false);
    trust(&fs.mnt, &store.key);
    install(&store.dir, "v1", &fs.mnt);
    // Leave ~6 MiB free (v1 -> v2 adds ~17 MiB) with ballast in a
    // preserved directory.
    let leave = 6u64 << 20;
    let ballast = fs.mnt.join("home/ballast");
    let size = avail(&fs.mnt).saturating_sub(leave);
    cmd(
        "fallocate",
        [
            OsStr::new("-l"),
            OsStr::new(&size.to_string()),
            ballast.as_os_str(),
        ],
    );
    let free = avail(&fs.mnt);
    assert!(free < 8 << 20, "ballast left {free} bytes free");
    let before = snapshot_root(&fs.mnt);

    // The preflight sees the shortage: exit 5, nothing written.
    let out = apply(&store.dir, "v2", &fs.mnt, &[]);
    expect_refused(&out, EXIT_PREFLIGHT, "not enough free space (preflight)");
    assert_unchanged(&fs.mnt, &before, "free-space preflight refusal");
    assert_converged(&v1, &fs.mnt, "free-space preflight refusal");
    assert_eq!(image_id(&fs.mnt).as_deref(), Some("v1"));

    // Without the preflight the disk really fills up while staging: the
    // apply fails, the root is unchanged.
    let out = imageupd(["apply", "--from"])
        .arg(&store.dir)
        .args(["--id", "v2", "--root"])
        .arg(&fs.mnt)
        .arg("--json")
        .env("IMAGEUPD_SKIP_SPACE_CHECK", "1")
        .run();
    assert_ne!(
        out.code(),
        Some(EXIT_OK),
        "apply succeeded on a full disk?\n{}",
        out.describe()
    );
    assert!(
        out.code().is_some(),
        "apply crashed on ENOSPC\n{}",
        out.describe()
    );
    assert!(
        out.all_output().to_lowercase().contains("space"),
        "the ENOSPC failure must say the disk is full\n{}",
        out.describe()
    );
    assert_unchanged(&fs.mnt, &before, "ENOSPC while staging");
    assert_converged(&v1, &fs.mnt, "ENOSPC while staging");
    assert_eq!(image_id(&fs.mnt).as_deref(), Some("v1"));
    eprintln!(
        "free space before {free}, after the failed staging {}",
        avail(&fs.mnt)
    );

    // With the ballast gone the same update goes through.
    std::fs::remove_file(&ballast).unwrap();
    apply_ok(&store.dir, "v2", &fs.mnt, "applied");
    assert_applied(&trees().v2, &fs.mnt, "v2", "apply after freeing space");
}

#[test]
fn failing_pre_apply_hook_aborts_and_runs_abort_hooks() {
    let node = Installed::new("prehook", "s1");
    let store = shared_store();
    let marks = node.dir.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let hooks = node.root.join("etc/imageupd/hooks");
    let m = marks.display();
    write_script(
        &hooks.join("pre-apply.d/10-ok"),
        &format!("echo pre10 >> {m}/log"),
    );
    write_script(
        &hooks.join("pre-apply.d/20-fail"),
        &format!("echo pre20 >> {m}/log; exit 3"),
    );
    write_script(
        &hooks.join("pre-apply.d/30-never"),
        &format!("echo pre30 >> {m}/log"),
    );
    write_script(
        &hooks.join("abort.d/10-restart"),
        &format!("echo abort10 >> {m}/log"),
    );
    write_script(
        &hooks.join("post-apply.d/10-never"),
        &format!("echo post10 >> {m}/log"),
    );
    let before = snapshot_root(&node.root);

    let out = node.apply(&store.dir, "s2", &[]);
    expect_refused(&out, EXIT_PRE_HOOK, "failing pre-apply hook");
    let log = std::fs::read_to_string(marks.join("log")).unwrap_or_default();
    assert_eq!(
        log,
        "pre10\npre20\nabort10\n",
        "hooks that ran (in order)\n{}",
        out.describe()
    );
    assert_unchanged(&node.root, &before, "failing pre-apply hook");
    assert_converged(&node.image, &node.root, "failing pre-apply hook");
    assert_eq!(image_id(&node.root).as_deref(), Some("s1"));
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
