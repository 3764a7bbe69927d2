//! Update deltas (`publish --parent`, `images/<id>/deltas/<parent>.delta`)
//! over `imageupd serve` on loopback, on the real fixture trees:
//!
//! - v1 → v3 (one binary changed) is exactly one HTTP request; the node then
//!   goes v3 → v2, for which no delta exists (another image): packs;
//! - v1 → v2 (a package update) in at most three requests, every object
//!   from the delta;
//! - a node exactly on the parent takes every object of the delta from it
//!   (v1 → v1 with debconf's Perl modules edited: patches whose paths sit
//!   where byte order and tree order differ); a node whose reference file
//!   for a patch has drifted gets that object from the store the usual way,
//!   the rest from the delta (the positive control of the count);
//! - a payload damaged on the server: the objects before the damage are
//!   kept (verified), the delta is dropped and the rest comes from packs —
//!   the apply succeeds (nothing unverified is ever kept);
//! - a damaged manifest patch, or a wrong embedded signature: the manifest is
//!   downloaded instead; a delta can never make a manifest trusted that the
//!   node's keys do not trust (wrongly signed or unsigned: exit 4, root
//!   untouched).
//!
//! Every successful apply is checked by the rsync and metadata oracles and
//! `verify --checksum`.

mod common;

use std::path::{Path, PathBuf};

use common::http::FileServer;
use common::serve::Server;
use common::*;
use imageupd::format::delta::{Header, Kind};
use imageupd::format::manifest::RelPath;

/// `imageupd apply --from URL --id ID --root ROOT --json`.
fn apply_url(url: &str, id: &str, root: &Path) -> Out {
    imageupd(["apply", "--from", url, "--id", id, "--root"])
        .arg(root)
        .arg("--json")
        .env("IMAGEUPD_LOG", "info")
        .run()
}

fn download(out: &Out) -> serde_json::Value {
    let d = out.json()["download"].clone();
    assert!(d.is_object(), "no download block\n{}", out.describe());
    d
}

fn fetch_objects(out: &Out) -> u64 {
    out.json()["plan"]["fetch_objects"]
        .as_u64()
        .expect("plan.fetch_objects")
}

/// A private (hard-linked) copy of the shared store with v1, v2 and v3.
fn store_copy(dst: &Path) -> PathBuf {
    let store = shared_store();
    for id in ["v1", "v2", "v3"] {
        store.image(id);
    }
    cmd(
        "cp",
        [
            std::ffi::OsStr::new("-al"),
            store.dir.as_os_str(),
            dst.as_os_str(),
        ],
    );
    dst.to_path_buf()
}

/// The delta file v1 → ID in STORE.
fn delta_path(store: &Path, id: &str) -> PathBuf {
    store.join("images").join(id).join("deltas/v1.delta")
}

/// A delta's parts: header, manifest patch, payload.
fn split_delta(bytes: &[u8]) -> (Header, Vec<u8>, Vec<u8>) {
    let (h, at) = Header::parse(bytes).expect("parse the delta header");
    let p = at + h.mpatch_len as usize;
    (h, bytes[at..p].to_vec(), bytes[p..].to_vec())
}

/// Replace (never rewrite: the copy shares inodes) the delta v1 → ID in
/// STORE with what EDIT makes of its parts.
fn edit_delta(store: &Path, id: &str, edit: impl FnOnce(&mut Header, &mut Vec<u8>, &mut Vec<u8>)) {
    let p = delta_path(store, id);
    let (mut h, mut mpatch, mut payload) = split_delta(&std::fs::read(&p).expect("read delta"));
    edit(&mut h, &mut mpatch, &mut payload);
    h.mpatch_len = mpatch.len() as u64;
    h.payload_len = payload.len() as u64;
    let mut out = h.encode();
    out.extend_from_slice(&mpatch);
    out.extend_from_slice(&payload);
    std::fs::remove_file(&p).expect("unlink delta");
    std::fs::write(&p, out).expect("write delta");
}

#[test]
fn one_binary_update_is_one_request_and_other_images_use_packs() {
    let store = shared_store();
    let v3 = store.image("v3");
    let v2 = store.image("v2");
    let s = scratch("delta-v3");
    let whole = std::fs::metadata(store.dir.join("images/v3/manifest.json.zst"))
        .expect("manifest")
        .len();
    let srv = Server::local(&store.dir, &s.join("serve.log"));
    let root = s.join("root");
    node_at("v1", &root);
    let out = apply_url(&srv.url, "v3", &root).expect_ok();
    let d = download(&out);
    eprintln!("v1 -> v3 through the delta: {d}");
    assert_eq!(d["delta"].as_str(), Some("v1"), "{}", out.describe());
    assert_eq!(d["requests"].as_u64(), Some(1), "{}", out.describe());
    let gets = srv.gets();
    assert_eq!(gets.len(), 1, "the server saw {gets:#?}");
    assert!(gets[0].contains("/images/v3/deltas/v1.delta"), "{gets:?}");
    let fetch = fetch_objects(&out);
    assert!(fetch >= 1, "{}", out.describe());
    assert_eq!(d["delta_objects"].as_u64(), Some(fetch), "{d}");
    assert_eq!(d["objects"].as_u64(), Some(fetch), "{d}");
    let bytes = d["bytes"].as_u64().expect("bytes");
    assert!(
        bytes * 20 < whole && bytes < 16 * 1024,
        "v1 -> v3 downloaded {bytes} bytes (the manifest alone is {whole}): {d}"
    );
    assert_applied(&v3, &root, "v3", "v1 -> v3 through the delta");

    // v3 -> v2: v2 has a delta from v1 only; this node takes the usual way.
    let out = apply_url(&srv.url, "v2", &root).expect_ok();
    let d = download(&out);
    assert!(d["delta"].is_null(), "{d}");
    assert_eq!(d["delta_objects"].as_u64(), Some(0), "{d}");
    // From packs, but for an object or two whose solid block would cost
    // more than fetching them loose.
    let want = fetch_objects(&out);
    let packed = d["packed_objects"].as_u64().unwrap_or(0);
    assert_eq!(d["objects"].as_u64(), Some(want), "{d}");
    assert!(packed <= want && packed * 50 >= want * 49, "{d}");
    assert!(d["requests"].as_u64().unwrap_or(99) <= 20, "{d}");
    assert_applied(&v2, &root, "v2", "v3 -> v2 without a delta");
}

#[test]
fn package_update_through_the_delta() {
    let store = shared_store();
    store.image("v1");
    let v2 = store.image("v2");
    let s = scratch("delta-v2");
    let srv = Server::local(&store.dir, &s.join("serve.log"));
    let root = s.join("root");
    node_at("v1", &root);
    let before = snapshot_root(&root);
    let plan = imageupd(["plan", "--from", &srv.url, "--id", "v2", "--root"])
        .arg(&root)
        .arg("--json")
        .ok();
    assert!(
        plan.json()["plan"]["fetch_objects"].as_u64().unwrap_or(0) > 100,
        "{}",
        plan.describe()
    );
    assert_unchanged(&root, &before, "plan through a delta");
    let out = apply_url(&srv.url, "v2", &root).expect_ok();
    let d = download(&out);
    eprintln!("v1 -> v2 through the delta: {d}");
    let fetch = fetch_objects(&out);
    assert_eq!(d["delta"].as_str(), Some("v1"), "{d}");
    let (h, _, _) = split_delta(&std::fs::read(delta_path(&store.dir, "v2")).expect("delta"));
    // The delta holds every object the node needs, and a few it does not:
    // v2's new files under /var/log/, which a node preserves.
    assert!(
        fetch <= h.objects.len() as u64,
        "the node fetched {fetch} objects; the delta holds {}",
        h.objects.len()
    );
    assert_eq!(d["delta_objects"].as_u64(), Some(fetch), "{d}");
    assert_eq!(d["objects"].as_u64(), Some(fetch), "{d}");
    assert_eq!(d["packed_objects"].as_u64(), Some(0), "{d}");
    let req = d["requests"].as_u64().expect("requests");
    assert!(req <= 3, "v1 -> v2 took {req} requests: {d}");
    let file = std::fs::metadata(delta_path(&store.dir, "v2"))
        .expect("delta")
        .len();
    let bytes = d["bytes"].as_u64().expect("bytes");
    assert!(
        bytes <= file + 1024,
        "{bytes} bytes downloaded; the delta is {file}: {d}"
    );
    assert_applied(&v2, &root, "v2", "v1 -> v2 through the delta");
}

/// Image id of v1 with every Perl module of debconf edited (a line added).
const DEBCONF_FIX: &str = "v1-debconf";

/// Add a line to every Perl module under TREE/usr/share/perl5/Debconf (in
/// place: TREE is a private copy); returns how many. Their paths sit next
/// to names such as `Debconf.pm` and `Debconf-*` whose byte order is not
/// their tree order: a lookup that mixes the two up misses some of them.
fn edit_debconf_modules(tree: &Path) -> usize {
    fn walk(d: &Path, n: &mut usize) {
        for e in std::fs::read_dir(d).expect("read_dir").flatten() {
            let p = e.path();
            let t = e.file_type().expect("file type");
            if t.is_dir() {
                walk(&p, n);
            } else if t.is_file() && p.extension().is_some_and(|x| x == "pm") {
                let mut c = std::fs::read(&p).expect("read module");
                c.extend_from_slice(b"# local fix\n");
                std::fs::write(&p, c).expect("edit module");
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(&tree.join("usr/share/perl5/Debconf"), &mut n);
    n
}

/// Of the delta's objects, how many the apply took from it and how many it
/// fetched some other way (packs, loose objects), from `apply --json`.
fn delta_use(out: &Out) -> (u64, u64) {
    let d = download(out);
    let taken = d["delta_objects"].as_u64().expect("delta_objects");
    let all = d["objects"].as_u64().expect("objects");
    (taken, all - taken)
}

#[test]
fn every_object_of_the_delta_comes_from_it_on_its_parent() {
    let shared = shared_store();
    let s = scratch("delta-whole");
    let store = store_copy(&s.join("store"));
    let tree = s.join(DEBCONF_FIX);
    copy_tree(&shared.image("v1"), &tree);
    let edited = edit_debconf_modules(&tree);
    assert!(edited >= 50, "only {edited} debconf modules in v1");
    publish(&store, DEBCONF_FIX, Some(&shared.key), Some("v1"), &tree);
    let (h, _, _) = split_delta(&std::fs::read(delta_path(&store, DEBCONF_FIX)).expect("delta"));
    let n = h.objects.len() as u64;
    let patches: Vec<&RelPath> = h
        .objects
        .iter()
        .filter_map(|o| match &o.kind {
            Kind::Patch { path, .. } => Some(path),
            Kind::Full => None,
        })
        .collect();
    assert_eq!(n, edited as u64, "one new object per edited module");
    assert!(
        patches.len() * 2 > edited,
        "most edited modules are patches: {} of {edited}",
        patches.len()
    );
    let srv = Server::local(&store, &s.join("serve.log"));

    // The node is exactly on the parent: every object comes from the delta.
    let root = s.join("root");
    node_at("v1", &root);
    let out = apply_url(&srv.url, DEBCONF_FIX, &root).expect_ok();
    let d = download(&out);
    eprintln!("v1 -> {DEBCONF_FIX} through the delta: {d}");
    assert_eq!(d["delta"].as_str(), Some("v1"), "{d}");
    assert_eq!(fetch_objects(&out), n, "{}", out.describe());
    assert_eq!(
        delta_use(&out),
        (n, 0),
        "(taken from the delta, fetched elsewhere) of its {n} objects: {d}"
    );
    assert_eq!(d["packed_objects"].as_u64(), Some(0), "{d}");
    assert_applied(
        &tree,
        &root,
        DEBCONF_FIX,
        "v1 -> v1-debconf through the delta",
    );

    // Positive control: a node whose copy of one patch's reference drifted
    // takes that object from the store, and the count shows it.
    let drifted = patches[patches.len() / 2];
    let path = String::from_utf8(drifted.0.clone()).expect("UTF-8 path");
    assert!(!path.is_empty() && !path.starts_with('/'), "{path:?}");
    let root = s.join("root-drifted");
    node_at("v1", &root);
    let f = root.join(&path);
    let mut content = std::fs::read(&f).expect("reference file");
    content.extend_from_slice(b"\n# edited on the node\n");
    std::fs::write(&f, content).expect("edit the reference file");
    let out = apply_url(&srv.url, DEBCONF_FIX, &root).expect_ok();
    let d = download(&out);
    assert_eq!(d["delta"].as_str(), Some("v1"), "{d}");
    assert_eq!(
        delta_use(&out),
        (n - 1, 1),
        "every object but {path}'s from the delta: {d}"
    );
    assert!(
        out.all_output().contains(&path),
        "the log names {path}\n{}",
        out.describe()
    );
    assert_applied(
        &tree,
        &root,
        DEBCONF_FIX,
        "v1 -> v1-debconf with a drifted reference",
    );
}

#[test]
fn damaged_payload_falls_back_to_packs() {
    let s = scratch("delta-payload");
    let store = store_copy(&s.join("store"));
    let v2 = shared_store().image("v2");
    edit_delta(&store, "v2", |_, _, payload| {
        let mid = payload.len() / 2;
        payload[mid] ^= 0x5a;
    });
    let srv = Server::local(&store, &s.join("serve.log"));
    let root = s.join("root");
    node_at("v1", &root);
    let out = apply_url(&srv.url, "v2", &root).expect_ok();
    let d = download(&out);
    let fetch = fetch_objects(&out);
    eprintln!("v1 -> v2, payload damaged: {d}");
    assert_eq!(
        d["delta"].as_str(),
        Some("v1"),
        "the manifest came from the delta: {d}"
    );
    let from_delta = d["delta_objects"].as_u64().expect("delta_objects");
    assert!(from_delta < fetch, "{d}");
    assert_eq!(d["objects"].as_u64(), Some(fetch), "{d}");
    assert!(
        d["packed_objects"].as_u64().unwrap_or(0) > 0,
        "the rest came from packs: {d}"
    );
    assert!(
        out.all_output().contains("dropped"),
        "the log says the delta was dropped\n{}",
        out.describe()
    );
    assert_applied(&v2, &root, "v2", "v1 -> v2 with a damaged delta payload");
}

#[test]
fn a_delta_never_makes_a_manifest_trusted() {
    let shared = shared_store();
    let v2 = shared.image("v2");
    let s = scratch("delta-trust");
    let root = s.join("root");
    node_at("v1", &root);
    let before = snapshot_root(&root);
    let other = keygen(s.path(), "other");
    let other_key = imageupd::format::sign::load_secret(&other.secret).expect("other key");
    let stored = std::fs::read(shared.dir.join("images/v2/manifest.json.zst")).expect("manifest");
    let forged = imageupd::format::sign::sign(&other_key, &stored);

    // Signed by a key the node does not trust, in the delta and the store.
    let store = store_copy(&s.join("wrong-key"));
    edit_delta(&store, "v2", |h, _, _| h.sig = Some(forged.clone()));
    let sig = store.join("images/v2/manifest.json.zst.sig");
    std::fs::remove_file(&sig).expect("unlink sig");
    std::fs::write(&sig, &forged).expect("write sig");
    let srv = Server::local(&store, &s.join("serve-wrong-key.log"));
    let out = apply_url(&srv.url, "v2", &root).expect_code(EXIT_UNTRUSTED);
    assert_unchanged(&root, &before, "a wrongly signed delta");
    drop(srv);
    let _ = out;

    // Unsigned, in the delta and the store.
    let store = store_copy(&s.join("unsigned"));
    edit_delta(&store, "v2", |h, _, _| h.sig = None);
    std::fs::remove_file(store.join("images/v2/manifest.json.zst.sig")).expect("unlink sig");
    let srv = Server::local(&store, &s.join("serve-unsigned.log"));
    apply_url(&srv.url, "v2", &root).expect_code(EXIT_UNTRUSTED);
    assert_unchanged(&root, &before, "an unsigned delta");
    drop(srv);

    // A wrong signature in the delta only: the manifest is downloaded with
    // the store's signature, the delta not used.
    let store = store_copy(&s.join("bad-sig"));
    edit_delta(&store, "v2", |h, _, _| h.sig = Some(forged.clone()));
    let srv = Server::local(&store, &s.join("serve-bad-sig.log"));
    let out = apply_url(&srv.url, "v2", &root).expect_ok();
    let d = download(&out);
    assert!(d["delta"].is_null(), "{d}");
    assert_eq!(d["delta_objects"].as_u64(), Some(0), "{d}");
    assert!(
        srv.gets()
            .iter()
            .any(|l| l.contains("/images/v2/manifest.json.zst.sig")),
        "the store's signature was fetched: {:#?}",
        srv.gets()
    );
    assert_applied(&v2, &root, "v2", "v1 -> v2, wrong signature in the delta");
    drop(srv);

    // A damaged manifest patch: the rebuilt manifest does not match, the
    // manifest is downloaded.
    let root = s.join("root2");
    node_at("v1", &root);
    let store = store_copy(&s.join("bad-patch"));
    edit_delta(&store, "v2", |_, mpatch, _| {
        let mid = mpatch.len() / 2;
        mpatch[mid] ^= 0x21;
    });
    let srv = Server::local(&store, &s.join("serve-bad-patch.log"));
    let out = apply_url(&srv.url, "v2", &root).expect_ok();
    let d = download(&out);
    assert!(d["delta"].is_null(), "{d}");
    assert_eq!(d["delta_objects"].as_u64(), Some(0), "{d}");
    assert_applied(&v2, &root, "v2", "v1 -> v2, damaged manifest patch");
}

#[test]
fn delta_through_a_server_that_ignores_range() {
    // The test file server answers every GET with the whole file (200): the
    // delta comes in one request and is used from memory.
    let store = shared_store();
    store.image("v1");
    let v2 = store.image("v2");
    let s = scratch("delta-norange");
    let srv = FileServer::over(&store.dir).start();
    let root = s.join("root");
    node_at("v1", &root);
    let out = apply_url(&srv.url, "v2", &root);
    drop(srv);
    let out = out.expect_ok();
    let d = download(&out);
    assert_eq!(d["delta"].as_str(), Some("v1"), "{d}");
    assert_eq!(d["requests"].as_u64(), Some(1), "{d}");
    assert_eq!(
        d["delta_objects"].as_u64(),
        Some(fetch_objects(&out)),
        "{d}"
    );
    assert_applied(
        &v2,
        &root,
        "v2",
        "v1 -> v2, delta from a server without Range",
    );
}

/// `imageupd publish … --json` of TREE as ID into STORE (no `--parent`),
/// with EXTRA arguments; returns the report.
fn publish_json(
    store: &Path,
    key: &Key,
    id: &str,
    tree: &Path,
    extra: &[&str],
) -> serde_json::Value {
    imageupd(["publish", "--store"])
        .arg(store)
        .args(["--id", id, "--level", "3", "--json", "--key"])
        .arg(&key.secret)
        .args(extra)
        .arg(tree)
        .ok()
        .json()
}

/// A build published without `--parent` (a CI job publishing as builds
/// come) reuses the store's newest image's packs and gets an update delta
/// from it, which a node on that image uses; `--no-delta` writes none, and
/// an unrelated image (sharing under half its objects) gets none either.
#[test]
fn a_build_published_without_parent_gets_a_delta_from_the_newest_image() {
    let shared = shared_store();
    let (v1, v3) = (shared.image("v1"), shared.image("v3"));
    let s = scratch("delta-auto");
    let store = s.join("store");
    let key = keygen(&s.join("keys"), "publisher");
    let r1 = publish_json(&store, &key, "v1", &v1, &[]);
    assert!(r1["delta"].is_null(), "the first image has no delta: {r1}");
    let r3 = publish_json(&store, &key, "v3", &v3, &[]);
    assert_eq!(r3["delta"]["from"], "v1", "{r3}");
    assert_eq!(
        r3["packs"]["reused_from"],
        serde_json::json!(["v1"]),
        "{r3}"
    );
    assert!(
        r3["packs"]["packed_objects"].as_u64().unwrap_or(99) < 5,
        "only what v1 lacks is packed again: {r3}"
    );
    // Opted out: packs reuse the newest images (v3, then v1), no delta.
    let rn = publish_json(&store, &key, "v3n", &v3, &["--no-delta"]);
    assert!(rn["delta"].is_null(), "{rn}");
    assert_eq!(rn["packs"]["new_packs"].as_u64(), Some(0), "{rn}");
    // Unrelated: a tree sharing nothing with v3n.
    let other = s.join("other");
    std::fs::create_dir_all(other.join("etc")).expect("mkdir");
    for i in 0..20 {
        std::fs::write(other.join(format!("etc/f{i}")), format!("unrelated {i}\n")).expect("write");
    }
    let ro = publish_json(&store, &key, "other", &other, &[]);
    assert!(
        ro["delta"].is_null(),
        "an unrelated image gets no delta: {ro}"
    );

    // A node on this store's v1 takes v3 through the automatic delta.
    let root = s.join("root");
    make_root(&v1, &root, &key);
    apply(&store, "v1", &root, &[]).expect_ok();
    let srv = Server::local(&store, &s.join("serve.log"));
    let out = apply_url(&srv.url, "v3", &root).expect_ok();
    let d = download(&out);
    assert_eq!(d["delta"], "v1", "{d}");
    assert_eq!(
        d["delta_objects"].as_u64(),
        Some(fetch_objects(&out)),
        "{d}"
    );
    assert_applied(&v3, &root, "v3", "v1 -> v3 through the automatic delta");
}
