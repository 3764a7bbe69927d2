//! End-to-end engine tests on real trees (debootstrap v1/v2/v3) and on the
//! synthetic special-case pair (s1/s2): publish, apply in every direction,
//! no-op applies, plain-directory sources, archive sources, and drift
//! detection by `verify`. Every apply is checked by two oracles that share no
//! code with imageupd (rsync itemize and a metadata walk), by `verify
//! --checksum`, and by /etc/image_id.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// Paths on the node that no apply may touch, with node-local content.
/// (Each one's parent exists in v1, v2 and v3; minbase has no /etc/ssh and
/// no kernel modules, so the synthetic pair covers those two.)
const NODE_LOCAL: &[(&str, &str)] = &[
    ("etc/hostname", "node-7\n"),
    ("etc/hosts", "127.0.0.1 localhost node-7\n"),
    ("etc/fstab", "/dev/vda1 / ext4 defaults 0 1\n"),
    ("etc/machine-id", "0123456789abcdef0123456789abcdef\n"),
    ("home/alice/notes.txt", "alice's notes\n"),
    ("root/.bash_history", "ls\n"),
    ("var/log/node.log", "node log line\n"),
    ("var/lib/os-collect-config/os_config_files.json", "[]\n"),
    ("tmp/scratch", "tmp data\n"),
    ("var/tmp/scratch", "var tmp data\n"),
    ("mnt/state/var/lib/mysql/ibdata1", "database\n"),
];

fn add_node_local(root: &Path) {
    for (p, content) in NODE_LOCAL {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, content).expect("write node-local file");
    }
}

#[track_caller]
fn assert_node_local(root: &Path, context: &str) {
    for (p, content) in NODE_LOCAL {
        let got = std::fs::read_to_string(root.join(p))
            .unwrap_or_else(|e| panic!("{context}: preserved {p} is gone: {e}"));
        assert_eq!(&got, content, "{context}: preserved {p} was changed");
    }
}

/// The phases/quiesce report promised by `apply --json`.
#[track_caller]
fn assert_apply_report(out: &Out) {
    let j = out.json();
    assert!(
        j["phases"].is_object() || j["phases"].is_array(),
        "apply --json has no \"phases\"\n{}",
        out.describe()
    );
    let q = &j["quiesce_ms"];
    if j["result"] == "applied" {
        assert!(
            q.is_u64() || q.is_f64(),
            "apply --json has no numeric \"quiesce_ms\"\n{}",
            out.describe()
        );
    } else {
        // Nothing was quiesced: a number or null.
        assert!(
            q.is_u64() || q.is_f64() || q.is_null(),
            "apply --json has no \"quiesce_ms\"\n{}",
            out.describe()
        );
        assert!(
            j.as_object().is_some_and(|o| o.contains_key("quiesce_ms")),
            "apply --json has no \"quiesce_ms\"\n{}",
            out.describe()
        );
    }
}

#[test]
fn real_trees_v1_v2_v3_v1_and_noop() {
    let store = shared_store();
    let v1 = store.image("v1");
    let v2 = store.image("v2");
    let v3 = store.image("v3");
    let s = scratch("real");
    let root = s.join("root");
    make_root(&v1, &root, &store.key);
    add_node_local(&root);

    // plan changes nothing and reports as JSON.
    let before = snapshot_root(&root);
    let plan = imageupd(["plan", "--from"])
        .arg(&store.dir)
        .args(["--id", "v2", "--root"])
        .arg(&root)
        .arg("--json")
        .ok();
    plan.json();
    assert_unchanged(&root, &before, "plan v1->v2");

    for (id, tree) in [("v2", &v2), ("v3", &v3), ("v1", &v1)] {
        let out = apply_ok(&store.dir, id, &root, "applied");
        eprintln!("apply -> {id}: {:.2?}", out.elapsed);
        assert_apply_report(&out);
        assert_applied(tree, &root, id, &format!("apply -> {id}"));
        assert_node_local(&root, &format!("apply -> {id}"));
    }

    // Applying the current image again is a no-op, in JSON and in text.
    let before = snapshot_root(&root);
    let out = apply_ok(&store.dir, "v1", &root, "nothing-to-do");
    assert_apply_report(&out);
    let text = imageupd(["apply", "--from"])
        .arg(&store.dir)
        .args(["--id", "v1", "--root"])
        .arg(&root)
        .ok();
    assert!(
        text.stdout.to_lowercase().contains("nothing to do"),
        "a no-op apply must say \"nothing to do\"\n{}",
        text.describe()
    );
    assert_unchanged(&root, &before, "no-op apply");
    assert_applied(&v1, &root, "v1", "after no-op");

    let st = imageupd(["status", "--root"]).arg(&root).arg("--json").ok();
    assert!(
        st.json().to_string().contains("\"v1\""),
        "status --json does not mention the current image v1\n{}",
        st.describe()
    );

    // Rollback returns to the image before the last update (v3), from the
    // source that update used, and then back again.
    let out = imageupd(["rollback", "--root"])
        .arg(&root)
        .arg("--json")
        .ok();
    assert_eq!(out.json()["id"], "v3", "{}", out.describe());
    assert_applied(&v3, &root, "v3", "rollback to v3");
    imageupd(["rollback", "--root"]).arg(&root).ok();
    assert_applied(&v1, &root, "v1", "rollback of the rollback");
}

#[test]
fn synthetic_s1_s2_s1_and_noop() {
    let store = shared_store();
    let s1 = store.image("s1");
    let s2 = store.image("s2");
    let s = scratch("synthetic");
    let root = s.join("root");
    // Installed at s1 first: the root's symlink types/symlink2dir, which s2
    // turns into a directory, is then known to be the image's own.
    install_root(store, "s1", &root);
    let krel = kernel_release();
    let running_ko = root
        .join("lib/modules")
        .join(&krel)
        .join("kernel/running.ko");
    assert!(
        running_ko.is_file(),
        "fixture s1 carries the running kernel's modules"
    );

    let out = apply_ok(&store.dir, "s2", &root, "applied");
    assert_apply_report(&out);
    assert_applied(&s2, &root, "s2", "s1 -> s2");
    // Preserve-list paths keep the node's (here: s1's) content.
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "image-s1\n",
        "etc/hostname was touched"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("home/user/file")).unwrap(),
        "user file s1\n",
        "home/ was touched"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/ssh/ssh_host_ed25519_key")).unwrap(),
        "image host key s1\n",
        "ssh host key was touched"
    );
    assert!(
        running_ko.is_file(),
        "the running kernel's modules were removed"
    );
    assert!(
        !root.join("lib/modules/0.0.0-other").exists(),
        "another kernel's modules were not removed"
    );
    // Capabilities survive the content change and the chown of caps/content.
    let caps = cmd("getcap", [root.join("caps/content")]);
    assert!(
        caps.contains("cap_net_bind_service"),
        "caps/content lost its capability: {caps}"
    );

    let out = apply_ok(&store.dir, "s1", &root, "applied");
    assert_apply_report(&out);
    assert_applied(&s1, &root, "s1", "s2 -> s1");

    let before = snapshot_root(&root);
    apply_ok(&store.dir, "s1", &root, "nothing-to-do");
    assert_unchanged(&root, &before, "no-op apply s1");
}

#[test]
fn plain_directory_source_from_mounted_image() {
    let store = shared_store();
    let v1 = store.image("v1");
    let v2 = trees().v2.clone();
    let s = scratch("plaindir");
    std::fs::create_dir_all(s.join("src")).unwrap();
    // The image, mounted read-only, as an operator would mount a qcow2/raw.
    let src = LoopFs::create(&s.join("src"), 1024, Some(&v2), true);
    let root = s.join("root");
    copy_tree(&v1, &root); // no trusted key: a directory source needs none
    let out = imageupd(["apply", "--from"])
        .arg(&src.mnt)
        .args(["--id", "v2", "--root"])
        .arg(&root)
        .arg("--json")
        .ok();
    assert_eq!(
        out.json()["result"].as_str(),
        Some("applied"),
        "{}",
        out.describe()
    );
    assert_applied(&src.mnt, &root, "v2", "apply --from <mounted dir>");
    // The mounted tree is v2 as far as rsync can tell (except the top
    // directory's mtime, which mkfs.ext4 -d does not copy).
    let r = oracle(&v2, &root);
    let r: Vec<&str> = r.lines().filter(|l| *l != ".d..t...... ./").collect();
    assert!(
        r.is_empty(),
        "root differs from the v2 tree after a directory-source apply:\n{}",
        clip(&r.join("\n"), 50)
    );
}

/// Manifest entries in a comparable form: hardlink groups normalised (which
/// name of a group is the "file" and which are "hardlink" depends on
/// traversal order, not on content), `created`/`parent` dropped.
fn normalized_entries(m: &Value) -> Vec<Value> {
    use std::collections::BTreeMap;
    let entries = m["entries"].as_array().expect("manifest has entries");
    let by_path: BTreeMap<Vec<u8>, &Value> = entries.iter().map(|e| (entry_path(e), e)).collect();
    let target_of = |e: &Value| entry_path(&serde_json::json!({ "path": e["target"].clone() }));
    // Union-find over hardlink edges; a group is named by its smallest path.
    let mut up: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    fn find(up: &BTreeMap<Vec<u8>, Vec<u8>>, x: &[u8]) -> Vec<u8> {
        let mut x = x.to_vec();
        while let Some(p) = up.get(&x) {
            if *p == x {
                break;
            }
            x = p.clone();
        }
        x
    }
    for e in entries.iter().filter(|e| e["type"] == "hardlink") {
        let (a, b) = (find(&up, &entry_path(e)), find(&up, &target_of(e)));
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        up.insert(hi, lo.clone());
        up.entry(lo.clone()).or_insert(lo);
    }
    entries
        .iter()
        .map(|e| {
            let p = entry_path(e);
            let mut e = e.clone();
            if e["type"] == "hardlink" {
                let file = by_path
                    .get(&target_of(&e))
                    .expect("hardlink target in manifest");
                for k in ["type", "size", "sha256"] {
                    e[k] = file[k].clone();
                }
                e.as_object_mut().expect("entry object").remove("target");
            }
            if up.contains_key(&p) {
                e["link_group"] = Value::String(show(&find(&up, &p)));
            }
            e
        })
        .collect()
}

/// Differences between two manifests of the same tree (one line each).
fn manifest_diffs(a: &Value, b: &Value, what: &str) -> Vec<String> {
    let mut diffs = Vec::new();
    for k in ["format", "kernel"] {
        if a[k] != b[k] {
            diffs.push(format!("{what}: {k} {} vs {}", a[k], b[k]));
        }
    }
    let (x, y) = (normalized_entries(a), normalized_entries(b));
    let (mut i, mut j) = (0, 0);
    while i < x.len() || j < y.len() {
        let px = x.get(i).map(|e| e["path"].to_string());
        let py = y.get(j).map(|e| e["path"].to_string());
        match (px, py) {
            (Some(a), Some(b)) if a == b => {
                if x[i] != y[j] {
                    diffs.push(format!("{what}: {a}:\n  dir: {}\n  tar: {}", x[i], y[j]));
                }
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                diffs.push(format!("{what}: {a}: only in the directory manifest"));
                i += 1;
            }
            (Some(a), None) => {
                diffs.push(format!("{what}: {a}: only in the directory manifest"));
                i += 1;
            }
            (_, Some(b)) => {
                diffs.push(format!("{what}: {b}: only in the archive manifest"));
                j += 1;
            }
            (None, None) => break,
        }
    }
    diffs
}

/// tar --xattrs --xattrs-include='*' --numeric-owner of TREE into OUT, with
/// the compression flag for OUT's suffix.
fn make_tar(tree: &Path, out: &Path) {
    let name = out.to_string_lossy();
    let z: &[&str] = if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        &["--gzip"]
    } else if name.ends_with(".tar.zst") {
        &["--zstd"]
    } else {
        &[]
    };
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("--xattrs"),
        OsStr::new("--xattrs-include=*"),
        OsStr::new("--numeric-owner"),
        OsStr::new("--format=posix"),
    ];
    args.extend(z.iter().map(OsStr::new));
    args.extend([
        OsStr::new("-C"),
        tree.as_os_str(),
        OsStr::new("-cf"),
        out.as_os_str(),
        OsStr::new("."),
    ]);
    cmd("tar", args);
}

#[test]
fn archive_sources_equal_directory_source() {
    let store = shared_store();
    let s2 = fixture_tree("s2");
    let s = scratch("archives");
    let mut problems: Vec<String> = Vec::new();

    // Reference: s2 published from its directory (without parent), applied
    // to a node installed at s1.
    let dir_store = s.join("store-dir");
    publish(&dir_store, "s2", Some(&store.key), None, &s2);
    let reference = read_manifest(&dir_store, "s2");
    let reference_root = s.join("root-dir");
    install_root(store, "s1", &reference_root);
    apply_ok(&dir_store, "s2", &reference_root, "applied");

    for ext in ["tar", "tar.gz", "tar.zst"] {
        let archive = s.join(format!("s2.{ext}"));
        make_tar(&s2, &archive);
        let st: PathBuf = s.join(format!("store-{}", ext.replace('.', "-")));
        publish(&st, "s2", Some(&store.key), None, &archive);
        problems.extend(manifest_diffs(
            &reference,
            &read_manifest(&st, "s2"),
            &format!("s2 from .{ext}"),
        ));

        // The same update from the archive's store leaves the same root.
        let root = s.join(format!("root-{}", ext.replace('.', "-")));
        install_root(store, "s1", &root);
        let out = apply(&st, "s2", &root, &[]);
        if out.code() != Some(EXIT_OK) {
            problems.push(format!(
                "apply of s2 published from .{ext} failed\n{}",
                out.describe()
            ));
        } else {
            let what = format!("root after applying s2 from .{ext} vs from the directory");
            problems.extend(
                meta_diff(&reference_root, &root)
                    .into_iter()
                    .map(|d| format!("{what}: {d}")),
            );
            problems.extend(
                oracle(&reference_root, &root)
                    .lines()
                    .map(|l| format!("{what} (rsync): {l}")),
            );
            if image_id(&root).as_deref() != Some("s2") {
                problems.push(format!("{what}: /etc/image_id is {:?}", image_id(&root)));
            }
        }
        std::fs::remove_dir_all(&root).expect("remove root");
    }

    // And a real tree: v2 from a .tar.zst equals v2 from its directory.
    let v2 = trees().v2.clone();
    let v2_dir_store = s.join("store-v2-dir");
    publish(&v2_dir_store, "v2", Some(&store.key), None, &v2);
    let archive = s.join("v2.tar.zst");
    make_tar(&v2, &archive);
    let v2_tar_store = s.join("store-v2-tar");
    publish(&v2_tar_store, "v2", Some(&store.key), None, &archive);
    problems.extend(manifest_diffs(
        &read_manifest(&v2_dir_store, "v2"),
        &read_manifest(&v2_tar_store, "v2"),
        "v2 from .tar.zst",
    ));

    assert!(
        problems.is_empty(),
        "archive sources differ from the directory source ({} problems):\n{}",
        problems.len(),
        clip(&problems.join("\n"), 80)
    );
}

/// Paths listed in a verify JSON array (strings, or objects with "path"),
/// without a leading slash.
fn listed(j: &Value, key: &str) -> Vec<String> {
    j[key]
        .as_array()
        .unwrap_or_else(|| panic!("verify --json has no array {key:?}: {j}"))
        .iter()
        .map(|v| match v {
            Value::String(s) => s.trim_start_matches('/').to_string(),
            o => o["path"]
                .as_str()
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_string(),
        })
        .collect()
}

#[track_caller]
fn verify_json(root: &Path, checksum: bool, expect: i32) -> Value {
    let out = verify(root, checksum);
    assert_eq!(
        out.code(),
        Some(expect),
        "verify (checksum={checksum}) exit code\n{}",
        out.describe()
    );
    out.json()
}

#[test]
fn verify_detects_drift() {
    let store = shared_store();
    let s = scratch("verify");
    let root = s.join("root");
    // A node installed at s2 (every special case), exactly equal to it.
    let s2 = install_root(store, "s2", &root);
    assert_applied(&s2, &root, "s2", "setup");

    // Preserved paths are not drift.
    std::fs::write(root.join("etc/hostname"), "renamed-node\n").unwrap();
    std::fs::write(root.join("var/log/new.log"), "log\n").unwrap();
    let j = verify_json(&root, true, EXIT_OK);
    for k in ["modified", "missing", "extra"] {
        assert!(
            listed(&j, k).is_empty(),
            "preserved paths reported as drift in {k}: {j}"
        );
    }

    // Same size, same mtime, different bytes: only --checksum sees it.
    let f = root.join("same/file");
    let md = std::fs::symlink_metadata(&f).unwrap();
    let content = std::fs::read(&f).unwrap();
    let mut tampered = content.clone();
    tampered[0] ^= 0x20;
    std::fs::write(&f, &tampered).unwrap();
    let mtime = format!(
        "@{}.{:09}",
        std::os::unix::fs::MetadataExt::mtime(&md),
        std::os::unix::fs::MetadataExt::mtime_nsec(&md)
    );
    cmd(
        "touch",
        [OsStr::new("-d"), OsStr::new(&mtime), f.as_os_str()],
    );
    let j = verify_json(&root, false, EXIT_OK);
    assert!(
        listed(&j, "modified").is_empty(),
        "verify without --checksum must trust size+mtime: {j}"
    );
    let j = verify_json(&root, true, EXIT_DRIFT);
    assert_eq!(
        listed(&j, "modified"),
        vec!["same/file".to_string()],
        "verify --checksum: {j}"
    );
    assert!(
        listed(&j, "missing").is_empty() && listed(&j, "extra").is_empty(),
        "{j}"
    );

    // Deleted, added, chmod-ed.
    std::fs::remove_file(root.join("links/a")).unwrap();
    std::fs::write(root.join("same/sub/intruder"), "extra\n").unwrap();
    cmd(
        "chmod",
        [OsStr::new("0600"), root.join("meta/owner_only").as_os_str()],
    );
    let j = verify_json(&root, false, EXIT_DRIFT);
    assert_eq!(
        listed(&j, "missing"),
        vec!["links/a".to_string()],
        "missing: {j}"
    );
    assert_eq!(
        listed(&j, "extra"),
        vec!["same/sub/intruder".to_string()],
        "extra: {j}"
    );
    let modified = listed(&j, "modified");
    assert!(
        modified.contains(&"meta/owner_only".to_string()),
        "chmod not reported as modified: {j}"
    );
    // Adding/removing entries changes the parents' mtimes; nothing else may be listed.
    for m in &modified {
        assert!(
            ["meta/owner_only", "links", "same/sub"].contains(&m.as_str()),
            "unexpected modified path {m:?}: {j}"
        );
    }
    let j = verify_json(&root, true, EXIT_DRIFT);
    assert!(
        listed(&j, "modified").contains(&"same/file".to_string()),
        "{j}"
    );
}

/// The oracles themselves must see every kind of difference the synthetic
/// pair contains (and nothing on the preserve list), or a clean oracle
/// would prove nothing.
#[test]
fn oracles_see_every_synthetic_difference() {
    let (s1, s2) = synthetic();
    assert_eq!(
        oracle(s1, s1).trim(),
        "",
        "rsync oracle of a tree against itself"
    );
    assert!(
        meta_diff(s1, s1).is_empty(),
        "metadata oracle of a tree against itself"
    );

    let m = meta_diff(s2, s1).join("\n");
    for needle in [
        "hardlinks/split_m: hardlink group",
        "hardlinks/join_u: hardlink group",
        "hardlinks/regroup_z: only in image",
        "hardlinks/content_p: kind/content",
        "meta/mtime_only: mtime_ns",
        "meta/symlink_mtime: mtime_ns",
        "meta/dir_mtime_only: mtime_ns",
        "meta/owner_only: owner",
        "meta/group_only: owner",
        "meta/symlink_owner: owner",
        "meta/mode_only: mode",
        "meta/dir_mode: mode",
        "modes/suid_gone: mode",
        "modes/suid_chown: owner",
        "xattrs/file: xattrs",
        "xattrs/removed: xattrs",
        "xattrs/dir: xattrs",
        "caps/netraw: xattrs",
        "caps/added: xattrs",
        "special/tty: kind",
        "special/sda: only in root",
        "special/fifo: mode",
        "types/file2dir: kind",
        "types/dir2symlink: kind",
        "types/dir2symlink/x: only in root",
        "sparse/holes: kind/content",
        "links/target_change: kind",
        "gone: only in root",
        "move/new/renamed.bin: only in image",
    ] {
        assert!(
            m.contains(needle),
            "metadata oracle misses {needle:?}:\n{m}"
        );
    }
    let running_modules = format!("lib/modules/{}", kernel_release());
    for preserved in [
        "etc/hostname",
        "etc/hosts",
        "etc/machine-id",
        "ssh_host_",
        "home/",
        "root/",
        "tmp/",
        "var/log",
        &running_modules,
    ] {
        assert!(
            !m.contains(preserved),
            "metadata oracle compares preserved {preserved:?}:\n{m}"
        );
    }
    assert!(
        m.contains("lib/modules/0.0.0-other: only in root"),
        "another kernel's modules are not preserved:\n{m}"
    );
    let r = oracle(s2, s1);
    for needle in [
        "types/file2dir",
        "caps/netraw",
        "meta/mtime_only",
        "special/tty",
        "*deleting   gone/",
        "names/dir_",
    ] {
        assert!(r.contains(needle), "rsync oracle misses {needle:?}:\n{r}");
    }
    assert!(
        !r.contains("etc/hostname") && !r.contains(&running_modules),
        "rsync oracle misses a preserve exclusion:\n{r}"
    );
    assert!(
        r.contains("lib/modules/0.0.1-new"),
        "rsync oracle excludes too much:\n{r}"
    );

    // A nanosecond-only mtime difference, and a same-size same-mtime
    // content change, are seen by both oracles' content/mtime checks.
    let s = scratch("oracle-selftest");
    let copy = s.join("copy");
    copy_tree(s1, &copy);
    cmd(
        "touch",
        ["-d", "@1700000000.123456788"]
            .map(OsStr::new)
            .into_iter()
            .chain([copy.join("same/file").as_os_str()]),
    );
    assert!(
        meta_diff(s1, &copy)
            .join("\n")
            .contains("same/file: mtime_ns"),
        "ns-only mtime difference missed"
    );
    let f = copy.join("same/sub/nested");
    std::fs::write(&f, "NESTED\n").unwrap();
    cmd(
        "touch",
        ["-d", "@1700000000.123456789"]
            .map(OsStr::new)
            .into_iter()
            .chain([f.as_os_str()]),
    );
    assert!(
        meta_diff(s1, &copy)
            .join("\n")
            .contains("same/sub/nested: kind/content"),
        "content change missed"
    );
    assert!(
        oracle(s1, &copy).contains("same/sub/nested"),
        "rsync --checksum missed a same-size same-mtime change"
    );
}

/// A root with no recorded image (its first apply) must not trust size and
/// mtime: synthetic s1 and s2 share both on five files whose bytes differ.
#[test]
fn first_apply_without_a_record_checks_contents() {
    let store = shared_store();
    let s1 = store.image("s1");
    let s2 = store.image("s2");
    let s = scratch("adopt");
    let root = s.join("root");
    make_root(&s1, &root, &store.key);
    // s1 has a symlink where s2 has a directory; without a record the engine
    // rightly refuses to replace a symlink it did not install.
    std::fs::remove_file(root.join("types/symlink2dir")).expect("remove symlink");
    let out = apply_ok(&store.dir, "s2", &root, "applied");
    assert_apply_report(&out);
    assert_applied(
        &s2,
        &root,
        "s2",
        "first apply of s2 onto an unrecorded s1 copy",
    );
}

#[test]
fn stamp_cache_never_hides_drift() {
    let store = shared_store();
    let s1 = store.image("s1");
    let s = scratch("stamps");
    let root = s.join("root");
    make_root(&s1, &root, &store.key);
    apply_ok(&store.dir, "s1", &root, "applied");
    // Inodes changed within the last two seconds are never cached (a second
    // change in the same clock tick would keep their ctime).
    std::thread::sleep(std::time::Duration::from_millis(2200));
    apply_ok(&store.dir, "s1", &root, "nothing-to-do");
    let warm = apply_ok(&store.dir, "s1", &root, "nothing-to-do").json();
    let walked = warm["walk"]["objects"].as_u64().unwrap_or(0);
    let cached = warm["walk"]["from_stamps"].as_u64().unwrap_or(0);
    assert!(
        walked > 50 && cached * 10 >= walked * 9,
        "a second no-op should take nearly every object from the stamp cache: {}",
        warm["walk"]
    );

    // Drift that keeps size and mtime, in what only the slow path reads:
    // a capability removed, an xattr value changed, a symlink retargeted
    // with the same mtime.
    let sh = |script: &str| {
        let st = std::process::Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(&root)
            .status()
            .expect("sh");
        assert!(st.success(), "{script}");
    };
    sh("setfattr -x security.capability caps/netraw");
    sh("setfattr -n user.color -v green xattrs/file");
    sh("t=$(stat -c %Y links/target_change); ln -sfn elsewhere links/target_change; touch -h -d @$t links/target_change");
    let out = apply_ok(&store.dir, "s1", &root, "applied");
    let j = out.json();
    assert!(
        j["plan"]["metadata_only"].as_u64().unwrap_or(0)
            + j["plan"]["changed"].as_u64().unwrap_or(0)
            >= 3,
        "the three drifted objects must be repaired\n{}",
        out.describe()
    );
    assert_applied(
        &s1,
        &root,
        "s1",
        "apply after drift behind a warm stamp cache",
    );

    // A damaged cache is ignored, not trusted.
    let cache = root.join("var/lib/imageupd/scan.stamps");
    let mut b = std::fs::read(&cache).expect("the stamp cache exists");
    let mid = b.len() / 2;
    b[mid] ^= 0x55;
    std::fs::write(&cache, &b).expect("damage the cache");
    sh("setfattr -n user.color -v purple xattrs/file");
    let out = apply_ok(&store.dir, "s1", &root, "applied");
    assert_eq!(out.json()["walk"]["from_stamps"], 0, "{}", out.describe());
    assert_applied(&s1, &root, "s1", "apply with a damaged stamp cache");
}

#[test]
fn first_apply_onto_an_empty_root() {
    // Provisioning into a blank filesystem: nothing but the trusted key.
    // (The state directory's parents are created by the apply itself after
    // planning; they must be adopted, not reported as "File exists".)
    let store = shared_store();
    let s1 = store.image("s1");
    let s = scratch("empty-root");
    let root = s.join("root");
    std::fs::create_dir_all(&root).expect("mkdir root");
    trust(&root, &store.key);
    let out = apply_ok(&store.dir, "s1", &root, "applied");
    assert_apply_report(&out);
    assert_applied(&s1, &root, "s1", "first apply onto an empty root");
}

/// Unmounts what this test mounted, also when it fails.
struct UmountOnDrop(Option<PathBuf>);

impl UmountOnDrop {
    fn umount(&mut self) {
        if let Some(p) = self.0.take() {
            sh(&format!("umount {}", p.display()));
        }
    }
}

impl Drop for UmountOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            if let Err(e) = std::process::Command::new("umount").arg(&p).status() {
                eprintln!("could not unmount {}: {e}", p.display());
            }
        }
    }
}

/// The directories `new` has and `old` lacks, tops only, with a
/// subdirectory (so a mount can sit inside one).
fn added_trees_with_subdirs(old: &Path, new: &Path) -> Vec<PathBuf> {
    fn walk(old: &Path, new: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(new.join(rel)) else {
            return;
        };
        let mut names: Vec<_> = rd.flatten().collect();
        names.sort_by_key(|e| e.file_name());
        for e in names {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let r = rel.join(e.file_name());
            if std::fs::symlink_metadata(old.join(&r)).is_err() {
                let has_sub = std::fs::read_dir(new.join(&r))
                    .map(|rd| {
                        rd.flatten()
                            .any(|c| c.file_type().is_ok_and(|t| t.is_dir()))
                    })
                    .unwrap_or(false);
                if has_sub {
                    out.push(r);
                }
            } else {
                walk(old, new, &r, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(old, new, Path::new(""), &mut out);
    out
}

/// Going back from v2 to v1 removes the trees v2 added by one rename each
/// inside the window (their files are deleted after the post-apply hooks),
/// but a tree with a filesystem mounted inside it is never moved: it goes
/// path by path, and the mount and its content stay. Control: once the
/// mount is gone, the same tree is removed.
#[test]
fn removed_trees_go_whole_but_never_with_a_mount_inside() {
    let store = shared_store();
    let (v1, v2) = (store.image("v1"), store.image("v2"));
    let s = scratch("gone-trees");
    let root = s.join("root");
    make_root(&v1, &root, &store.key);
    apply_ok(&store.dir, "v2", &root, "applied");
    let added = added_trees_with_subdirs(&v1, &v2);
    assert!(
        added.len() >= 2,
        "v2 adds trees with subdirectories: {added:?}"
    );
    let (mounted, whole) = (&added[0], &added[1]);
    let sub = std::fs::read_dir(root.join(mounted))
        .expect("read the tree")
        .flatten()
        .find(|c| c.file_type().is_ok_and(|t| t.is_dir()))
        .expect("a subdirectory")
        .path();
    sh(&format!("mount -t tmpfs imageupd-test {}", sub.display()));
    let mut guard = UmountOnDrop(Some(sub.clone()));
    std::fs::write(sub.join("foreign"), "on another filesystem\n").expect("write on the tmpfs");

    let out = apply_ok(&store.dir, "v1", &root, "applied");
    let j = out.json();
    let sw = &j["swap"];
    assert!(sw["deleted_trees"].as_u64() >= Some(1), "{sw:#}");
    assert!(sw["set_aside"].as_u64() >= Some(1), "{sw:#}");
    assert_eq!(sw["cleanup_deferred"], true, "{sw:#}");
    assert!(j["phases"]["cleanup"].is_u64(), "{j:#}");
    assert!(
        !root.join(whole).exists(),
        "{} was not removed",
        whole.display()
    );
    assert_eq!(
        std::fs::read_to_string(sub.join("foreign")).ok().as_deref(),
        Some("on another filesystem\n"),
        "the mounted filesystem's content survived"
    );
    assert!(
        mounts::mounts_under(&root).contains(&sub),
        "the mount at {} is still in place",
        sub.display()
    );
    let stage = root.join("var/lib/imageupd/stage");
    assert!(
        std::fs::read_dir(&stage).map_or(true, |mut d| d.next().is_none()),
        "nothing is left in {}",
        stage.display()
    );
    assert!(
        j["warnings"].to_string().contains("mounted"),
        "the kept mount is reported: {}",
        j["warnings"]
    );

    // Control: without the mount the same tree goes.
    guard.umount();
    apply_ok(&store.dir, "v1", &root, "applied");
    assert!(
        !root.join(mounted).exists(),
        "control: {} is removed once nothing is mounted in it",
        mounted.display()
    );
    assert_applied(&v1, &root, "v1", "after the control");
}
