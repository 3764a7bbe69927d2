//! The store's root of trust and signed index (issue 13), after TUF: a
//! k-of-n root naming the keys of each role, rotated by a chain of signed
//! versions (a key left out is revoked), and an expiring, versioned index
//! that binds each manifest by digest and length. A pack index (served
//! over HTTP) must meet the same targets threshold as its manifest.
//!
//! Each attack is refused with exit 4 and the root byte-identical (full
//! snapshot); each has its positive control in the same test.

mod common;

use std::path::{Path, PathBuf};

use common::serve::Server;
use common::*;

/// Keys: root r1..r3 (2 of 3), targets t1, t2 (2 of 2), timestamp s.
struct Keys {
    r: Vec<Key>,
    t: Vec<Key>,
    s: Key,
}

/// A store signed under root v1 with images a (release 1) and b (2), and
/// a node at a whose anchor is that root.
struct Fixture {
    _s: Scratch,
    dir: PathBuf,
    store: PathBuf,
    keys: Keys,
    root: PathBuf,
    before: Tree,
}

fn trust(args: &[&str]) -> Run {
    imageupd(["trust"]).args(args)
}

fn p(x: &Path) -> &str {
    x.to_str().unwrap()
}

impl Fixture {
    #[track_caller]
    fn new(name: &str) -> Fixture {
        let s = scratch(name);
        let dir = s.path().to_path_buf();
        let kd = dir.join("keys");
        let keys = Keys {
            r: (1..=3).map(|i| keygen(&kd, &format!("root{i}"))).collect(),
            t: (1..=2)
                .map(|i| keygen(&kd, &format!("targets{i}")))
                .collect(),
            s: keygen(&kd, "timestamp"),
        };
        let store = dir.join("store");
        let (t1, _) = synthetic();
        let f = Fixture {
            _s: s,
            dir,
            store,
            keys,
            root: PathBuf::new(),
            before: Tree::default(),
        };
        // The store exists once its first image is in; root v1 goes in next.
        f.publish("a", t1, &[0, 1]);
        let draft = f.dir.join("root-v1.json");
        let mut init = vec!["init", "--root-threshold", "2", "--targets-threshold", "2"];
        for k in &f.keys.r {
            init.extend(["--root-key", p(&k.public)]);
        }
        for k in &f.keys.t {
            init.extend(["--targets-key", p(&k.public)]);
        }
        init.extend(["--timestamp-key", p(&f.keys.s.public), "--out", p(&draft)]);
        trust(&init).ok();
        // One signature is below the root threshold: publish refuses it.
        trust(&["sign", "--key", p(&f.keys.r[0].secret), p(&draft)]).ok();
        let out = trust(&["publish", "--store", p(&f.store), p(&draft)]).run();
        assert_eq!(out.code(), Some(EXIT_UNTRUSTED), "{}", out.describe());
        trust(&["sign", "--key", p(&f.keys.r[2].secret), p(&draft)]).ok();
        trust(&["publish", "--store", p(&f.store), p(&draft)]).ok();
        f.timestamp(24);
        f
    }

    /// Publish TREE as ID signed by the targets keys at indexes `by`.
    #[track_caller]
    fn publish(&self, id: &str, tree: &Path, by: &[usize]) {
        self.publish_with(id, tree, by, &[]);
    }

    /// Publish `id` signed by targets keys `by`, with further flags.
    #[track_caller]
    fn publish_with(&self, id: &str, tree: &Path, by: &[usize], flags: &[&str]) {
        let mut r = imageupd(["publish", "--store"])
            .arg(&self.store)
            .args(["--id", id, "--level", "3"])
            .args(flags);
        for &i in by {
            r = r.arg("--key").arg(&self.keys.t[i].secret);
        }
        r.arg(tree).ok();
    }

    #[track_caller]
    fn timestamp(&self, hours: u32) {
        trust(&[
            "timestamp",
            "--store",
            p(&self.store),
            "--key",
            p(&self.keys.s.secret),
            "--expires-hours",
            &hours.to_string(),
        ])
        .ok();
    }

    /// The node at image a, its anchor the store's root.json.
    #[track_caller]
    fn node(mut self) -> Fixture {
        let root = self.dir.join("node");
        make_root(&synthetic().0, &root, &self.keys.t[0]);
        std::fs::copy(
            self.store.join("root.json"),
            root.join("etc/imageupd/root.json"),
        )
        .unwrap();
        let out = apply(&self.store, "a", &root, &[]).expect_ok();
        let j = out.json();
        assert_eq!(j["index"]["root_version"], 1, "{}", out.describe());
        self.before = snapshot_root(&root);
        self.root = root;
        self
    }

    #[track_caller]
    fn refused(&self, id: &str, needle: &str, context: &str) {
        let out = apply(&self.store, id, &self.root, &[]);
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
        assert_unchanged(&self.root, &self.before, context);
        assert_eq!(image_id(&self.root).as_deref(), Some("a"), "{context}");
    }

    #[track_caller]
    fn applied(&mut self, id: &str, context: &str) -> serde_json::Value {
        let out = apply(&self.store, id, &self.root, &[]).expect_ok();
        assert_eq!(
            image_id(&self.root).as_deref(),
            Some(id),
            "{context}\n{}",
            out.describe()
        );
        self.before = snapshot_root(&self.root);
        out.json()
    }
}

#[test]
fn k_of_n_manifest_signatures() {
    let mut f = Fixture::new("tuf-threshold").node();
    let (_, t2) = synthetic();
    // Signed by one of the two targets keys: below the threshold.
    f.publish("b1", t2, &[1]);
    f.timestamp(24);
    f.refused("b1", "2 required", "one targets signature of two");
    // Control: both keys.
    f.publish("b2", t2, &[0, 1]);
    f.timestamp(24);
    let j = f.applied("b2", "two targets signatures");
    assert_eq!(
        j["signed_by"].as_str().unwrap().split(',').count(),
        2,
        "{j}"
    );
    assert!(j["index"]["age_secs"].as_i64().unwrap() >= 0, "{j}");
    assert_eq!(j["index"]["expired"], false);
}

#[test]
fn an_older_or_expired_index_is_refused() {
    let mut f = Fixture::new("tuf-index").node();
    let (_, t2) = synthetic();
    f.publish("b", t2, &[0, 1]);
    let old = std::fs::read(f.store.join("timestamp.json")).unwrap();
    f.timestamp(24);
    let j = f.applied("b", "fresh index");
    let seen = j["index"]["version"].as_u64().unwrap();
    // Roll back to a (listed) image with the older index replayed.
    f.publish("c", &synthetic().0, &[0, 1]);
    std::fs::write(f.store.join("timestamp.json"), &old).unwrap();
    let before_id = "b";
    let out = apply(&f.store, "c", &f.root, &[]);
    assert_eq!(out.code(), Some(EXIT_UNTRUSTED), "{}", out.describe());
    assert!(
        out.all_output()
            .contains("older one than this node has seen"),
        "{}",
        out.describe()
    );
    assert_unchanged(&f.root, &f.before, "older index");
    assert_eq!(image_id(&f.root).as_deref(), Some(before_id));
    // An expired index (0 hours): refused, then accepted by policy.
    f.timestamp(0);
    let out = apply(&f.store, "c", &f.root, &[]);
    assert_eq!(out.code(), Some(EXIT_UNTRUSTED), "{}", out.describe());
    assert!(out.all_output().contains("expired"), "{}", out.describe());
    assert_unchanged(&f.root, &f.before, "expired index");
    write_config(&f.root, "allow_expired_index = true\n");
    let out = apply(&f.store, "c", &f.root, &[]).expect_ok();
    let j = out.json();
    assert_eq!(j["index"]["expired"], true, "{}", out.describe());
    assert!(j["index"]["version"].as_u64().unwrap() >= seen);
    assert_eq!(image_id(&f.root).as_deref(), Some("c"));
}

#[test]
fn a_manifest_not_listed_as_signed_is_refused() {
    let f = Fixture::new("tuf-mix").node();
    let (_, t2) = synthetic();
    // Published but never listed: the index predates it.
    f.publish("b", t2, &[0, 1]);
    f.refused("b", "not in the store's signed index", "unlisted image");
    // Listed, then its manifest swapped for another validly signed one.
    f.publish("c", t2, &[0, 1]);
    f.timestamp(24);
    let (b, c) = (f.store.join("images/b"), f.store.join("images/c"));
    for n in ["manifest.json.zst", "manifest.json.zst.sig"] {
        std::fs::copy(b.join(n), c.join(n)).unwrap();
    }
    f.refused("c", "not the one the signed index lists", "mix and match");
    // Control: b itself, now listed, applies.
    let mut f = f;
    f.applied("b", "listed image");
}

#[test]
fn keys_rotate_by_the_root_chain_and_revoked_keys_stop_signing() {
    let mut f = Fixture::new("tuf-rotate").node();
    let kd = f.dir.join("keys");
    let t3 = keygen(&kd, "targets3");
    let draft = f.dir.join("root-v2.json");
    trust(&[
        "rotate",
        "--store",
        p(&f.store),
        "--targets-key",
        p(&t3.public),
        "--targets-threshold",
        "1",
        "--out",
        p(&draft),
    ])
    .ok();
    // Signed by one root key only: below both thresholds.
    trust(&["sign", "--key", p(&f.keys.r[1].secret), p(&draft)]).ok();
    let out = trust(&["publish", "--store", p(&f.store), p(&draft)]).run();
    assert_eq!(out.code(), Some(EXIT_UNTRUSTED), "{}", out.describe());
    assert!(!f.store.join("root/2.root.json").exists());
    trust(&["sign", "--key", p(&f.keys.r[2].secret), p(&draft)]).ok();
    trust(&["publish", "--store", p(&f.store), p(&draft)]).ok();
    let (_, t2) = synthetic();
    // The revoked targets keys still sign validly, but no longer count.
    f.publish("b-old-keys", t2, &[0, 1]);
    f.timestamp(24);
    f.refused("b-old-keys", "required", "revoked targets keys");
    // Control: the new key.
    let out = imageupd(["publish", "--store"])
        .arg(&f.store)
        .args(["--id", "b-new-key", "--level", "3", "--key"])
        .arg(&t3.secret)
        .arg(t2)
        .ok();
    assert!(out.stdout.contains("signed"), "{}", out.describe());
    f.timestamp(24);
    let j = f.applied("b-new-key", "new targets key");
    assert_eq!(j["index"]["root_version"], 2, "{j}");
    // (The chain was followed, and v2 kept, by the refused run above.)
    assert_eq!(j["index"]["root_rotations"], 0, "{j}");
    // The node keeps the newer root: even with root/2 gone from the store,
    // the revoked keys stay revoked.
    std::fs::remove_file(f.store.join("root/2.root.json")).unwrap();
    f.publish("c-old-keys", &synthetic().0, &[0, 1]);
    f.timestamp(24);
    let out = apply(&f.store, "c-old-keys", &f.root, &[]);
    assert_eq!(out.code(), Some(EXIT_UNTRUSTED), "{}", out.describe());
    assert_unchanged(&f.root, &f.before, "root v2 forgotten by the store");
}

/// `provision --root-of-trust FILE` checks the image as `apply` checks it
/// against a node's root.json (targets threshold, the signed index), before
/// any disk is written, and installs that root as the new root's anchor.
#[test]
fn provision_verifies_against_the_root_of_trust() {
    let f = Fixture::new("tuf-provision");
    let (_, t2) = synthetic();
    // Signed by one of the two targets keys: below the threshold.
    f.publish("b1", t2, &[1]);
    f.timestamp(24);
    let disk = f.dir.join("disk.raw");
    std::fs::File::create(&disk)
        .and_then(|d| d.set_len(320 << 20))
        .unwrap();
    let scheme = f.dir.join("scheme.toml");
    std::fs::write(
        &scheme,
        "firmware = \"bios\"\n[[disk]]\nname = \"vda\"\n[[disk.partition]]\nrole = \"bios-boot\"\n[[disk.partition]]\nrole = \"root\"\nmin = \"256MiB\"\n",
    )
    .unwrap();
    // No trusted keys at all: only the root of trust can vouch.
    let no_keys = f.dir.join("no-keys");
    std::fs::create_dir_all(&no_keys).unwrap();
    let anchor = f.store.join("root.json");
    let provision = |id: &str| {
        imageupd(["provision", "--json", "--from", p(&f.store), "--id", id])
            .args(["--scheme", p(&scheme), "--disk", p(&disk)])
            .args(["--trusted-keys", p(&no_keys), "--root-of-trust", p(&anchor)])
            .run()
    };
    let before = sha256_file(&disk);
    let out = provision("b1");
    assert_eq!(out.code(), Some(EXIT_UNTRUSTED), "{}", out.describe());
    assert!(out.stderr.contains("2 required"), "{}", out.describe());
    assert_eq!(
        sha256_file(&disk),
        before,
        "a refused image changed the disk"
    );
    // Control: a is signed by both targets keys.
    let out = provision("a").expect_ok();
    let j = out.json();
    assert_eq!(j["result"], "provisioned", "{}", out.describe());
    let root = j["plan"]["disks"][0]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["role"] == "root")
        .unwrap()
        .clone();
    let lo = cmd(
        "losetup",
        [
            "--find",
            "--show",
            "--read-only",
            "--offset",
            &root["start_bytes"].to_string(),
            "--sizelimit",
            &root["size_bytes"].to_string(),
            p(&disk),
        ],
    )
    .trim()
    .to_string();
    let mnt = f.dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Run::new("mount").args(["-o", "ro", &lo, p(&mnt)]).run();
    let installed = std::fs::read(mnt.join("etc/imageupd/root.json"));
    let id = image_id(&mnt);
    if mounted.code() == Some(0) {
        Run::new("umount").arg(&mnt).ok();
    }
    Run::new("losetup").args(["-d", &lo]).ok();
    assert_eq!(mounted.code(), Some(0), "{}", mounted.describe());
    assert_eq!(
        installed.expect("the new root has etc/imageupd/root.json"),
        std::fs::read(&anchor).unwrap()
    );
    assert_eq!(id.as_deref(), Some("a"));
}

/// Under a root of trust a pack index needs the targets threshold (k of
/// n signatures), like a manifest; control: with both keys it is used.
#[test]
fn a_pack_index_must_meet_the_targets_threshold() {
    let f = Fixture::new("tuf-packs").node();
    let (_, t2) = synthetic();
    // No update delta from a: the node would take every object from it
    // and never need the pack index.
    f.publish_with("b", t2, &[0, 1], &["--no-delta"]);
    f.timestamp(24);
    let dir = f.store.join("images/b");
    let (idx, sig) = (dir.join("packs.idx.zst"), dir.join("packs.idx.zst.sig"));
    let both = std::fs::read(&sig).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&both).lines().count(),
        2,
        "the publisher signs the pack index with every --key"
    );
    let srv = Server::local(&f.store, &f.dir.join("serve.log"));
    let over_http = |f: &Fixture| {
        imageupd(["apply", "--from", &srv.url, "--id", "b", "--root"])
            .arg(&f.root)
            .arg("--json")
            .run()
    };
    // One targets key (of the 2 the root requires) signs the pack index
    // alone, as a thief of that key could: refused, though the manifest
    // itself carries both signatures.
    imageupd::format::sign::sign_file(&f.keys.t[1].secret, &idx).expect("sign with t2 alone");
    let out = over_http(&f);
    assert_eq!(out.code(), Some(EXIT_UNTRUSTED), "{}", out.describe());
    for needle in ["pack index of image \"b\"", "2 required"] {
        assert!(
            out.all_output().contains(needle),
            "the message must say {needle:?}\n{}",
            out.describe()
        );
    }
    assert_unchanged(&f.root, &f.before, "pack index below the threshold");
    assert_eq!(image_id(&f.root).as_deref(), Some("a"));
    // Control: the publisher's two signatures; the objects come from packs.
    std::fs::write(&sig, &both).unwrap();
    let out = over_http(&f).expect_ok();
    assert_eq!(
        image_id(&f.root).as_deref(),
        Some("b"),
        "{}",
        out.describe()
    );
    let packed = out.json()["download"]["packed_objects"].as_u64();
    assert!(
        packed.unwrap_or(0) > 0,
        "the control must fetch through the pack index\n{}",
        out.describe()
    );
}
