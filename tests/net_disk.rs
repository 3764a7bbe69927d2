//! Disk images and packs (SPEC §2, §3, §9; issue 5).
//!
//! - A qcow2 (GPT: a small ext4 "boot" partition and the ext4 root) and a
//!   raw image (MBR: an xfs root and a larger ext4 data partition without
//!   /etc, so the size rule alone would pick the wrong one) are built from
//!   the v1 debootstrap tree with `sfdisk`, `mkfs.ext4 -d`, `mkfs.xfs` and
//!   `qemu-img`, and published. Then, as Ironic would: HEAD answers 200 with
//!   Content-Length, GET answers exactly 200 with bytes whose sha256 is the
//!   line for that basename in `SHA256SUMS`, and `qemu-img info` on the
//!   download reports the right format. The ingested tree, applied to a
//!   node, matches the source tree (rsync and metadata oracles).
//! - Bad disks: no root filesystem, a qcow2 with a backing file, a corrupt
//!   qcow2 (the tool's stderr is in the error); nothing stays mounted or
//!   attached, no scratch is left.
//! - Packs: v1 → v2 over HTTP takes a few dozen requests (against thousands
//!   loose), the oracle is clean; a tampered pack byte and a tampered pack
//!   index are refused (exit 4) with the root untouched.
//! - Manifest frames: v1 -> v3 (one binary) downloads a fraction of the
//!   manifest's size in a handful of requests.

mod common;

use std::path::{Path, PathBuf};

use std::time::Duration;

use common::serve::Server;
use common::*;

/// Partition table of a test disk.
#[derive(Clone, Copy, Debug)]
enum Table {
    /// GPT: p1 16 MiB ext4 without /etc ("boot"), p2 the root.
    Gpt,
    /// MBR: p1 the root (xfs), p2 a larger ext4 without /etc ("data").
    Mbr,
}

/// Size of the root filesystem in the test disks, MiB.
const ROOT_MIB: u64 = 400;

/// Build DIR/NAME: a disk with TABLE, the root filesystem made from TREE,
/// converted to qcow2 when NAME ends with .qcow2. Sparse throughout.
/// Returns the disk and its root filesystem as a separate file.
///
/// GPT disks get an ext4 root, MBR disks an xfs root. `mkfs.ext4 -d` keeps
/// whole seconds of mtimes only, and creating lost+found changes the top
/// directory's mtime, which is set back with debugfs so that the rsync
/// oracle (seconds) can compare with TREE.
#[track_caller]
fn make_disk(dir: &Path, name: &str, table: Table, tree: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("disk dir");
    let rootfs = dir.join(format!("{name}.rootfs"));
    match table {
        Table::Gpt => {
            cmd(
                "mkfs.ext4",
                [
                    "-q".as_ref(),
                    "-F".as_ref(),
                    "-t".as_ref(),
                    "ext4".as_ref(),
                    "-d".as_ref(),
                    tree.as_os_str(),
                    rootfs.as_os_str(),
                    format!("{ROOT_MIB}M").as_ref(),
                ],
            );
            let secs = std::fs::metadata(tree)
                .and_then(|m| m.modified())
                .expect("tree mtime")
                .duration_since(std::time::UNIX_EPOCH)
                .expect("epoch")
                .as_secs();
            cmd(
                "debugfs",
                [
                    "-w".as_ref(),
                    "-R".as_ref(),
                    format!("sif / mtime @{secs}").as_ref(),
                    rootfs.as_os_str(),
                ],
            );
        }
        Table::Mbr => {
            // xfs has no mkfs -d: fill it through a read-write loop mount.
            let mnt = dir.join(format!("{name}.fill"));
            std::fs::create_dir_all(&mnt).expect("fill mount point");
            sh(&format!(
                "truncate -s {ROOT_MIB}M '{fs}' && mkfs.xfs -q -f '{fs}' && \
                 mount -o loop '{fs}' '{m}' && \
                 {{ cp -a '{t}/.' '{m}/' && touch -r '{t}' '{m}'; rc=$?; umount '{m}'; exit $rc; }}",
                fs = rootfs.display(),
                m = mnt.display(),
                t = tree.display()
            ));
        }
    }
    let other = dir.join(format!("{name}.other"));
    std::fs::create_dir_all(dir.join("other-tree/boot")).expect("other tree");
    std::fs::write(dir.join("other-tree/boot/README"), "not a root\n").expect("readme");
    let other_mib = match table {
        Table::Gpt => 16,
        Table::Mbr => ROOT_MIB + 100,
    };
    cmd(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-d".as_ref(),
            dir.join("other-tree").as_os_str(),
            other.as_os_str(),
            format!("{other_mib}M").as_ref(),
        ],
    );
    let raw = dir.join(format!("{name}.raw-build"));
    let total = 1 + ROOT_MIB + other_mib + 2;
    cmd(
        "truncate",
        ["-s".as_ref(), format!("{total}M").as_ref(), raw.as_os_str()],
    );
    // (first partition, second partition) in MiB.
    let (p1, p2, script) = match table {
        Table::Gpt => (
            (1, other_mib),
            (1 + other_mib, ROOT_MIB),
            format!("label: gpt\n,{other_mib}MiB,L\n,{ROOT_MIB}MiB,L\n"),
        ),
        Table::Mbr => (
            (1, ROOT_MIB),
            (1 + ROOT_MIB, other_mib),
            format!("label: dos\n,{ROOT_MIB}MiB,83\n,{other_mib}MiB,83\n"),
        ),
    };
    sh(&format!(
        "printf '{}' | sfdisk --quiet '{}'",
        script.replace('\n', "\\n"),
        raw.display()
    ));
    let (f1, f2) = match table {
        Table::Gpt => (&other, &rootfs),
        Table::Mbr => (&rootfs, &other),
    };
    for (fs, (start, _)) in [(f1, p1), (f2, p2)] {
        sh(&format!(
            "dd if='{}' of='{}' bs=1M seek={start} conv=notrunc,sparse status=none",
            fs.display(),
            raw.display()
        ));
    }
    std::fs::remove_file(&other).expect("rm other");
    let out = dir.join(name);
    if name.ends_with(".qcow2") {
        cmd(
            "qemu-img",
            [
                "convert".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                raw.as_os_str(),
                out.as_os_str(),
            ],
        );
        std::fs::remove_file(&raw).expect("rm raw");
    } else {
        std::fs::rename(&raw, &out).expect("rename raw");
    }
    (out, rootfs)
}

/// A filesystem image mounted read-only (loop), unmounted when dropped.
struct RoMount(PathBuf);

impl RoMount {
    #[track_caller]
    fn new(fs: &Path, at: &Path) -> RoMount {
        std::fs::create_dir_all(at).expect("mount point");
        cmd(
            "mount",
            [
                "-o".as_ref(),
                "loop,ro".as_ref(),
                fs.as_os_str(),
                at.as_os_str(),
            ],
        );
        RoMount(at.to_path_buf())
    }
}

impl Drop for RoMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("http client")
}

fn sha256_hex(b: &[u8]) -> String {
    imageupd::format::manifest::Digest::of(b).to_hex()
}

/// `publish --json` of SOURCE as ID; the report.
#[track_caller]
fn publish_json(store: &Path, id: &str, key: &Key, source: &Path) -> serde_json::Value {
    imageupd(["publish", "--store"])
        .arg(store)
        .args(["--id", id, "--level", LEVEL, "--json", "--key"])
        .arg(&key.secret)
        .arg(source)
        .timeout(Duration::from_secs(600))
        .ok()
        .json()
}

/// Nothing of a publish is left behind: no mount, no loop device on the
/// store's scratch files, an empty scratch directory.
#[track_caller]
fn assert_released(store: &Path, context: &str) {
    let m = mounts_under(store);
    assert!(m.is_empty(), "{context}: still mounted: {m:?}");
    let loops = sh("losetup --list --noheadings --output BACK-FILE || true");
    let s = store.display().to_string();
    assert!(
        !loops.lines().any(|l| l.contains(&s)),
        "{context}: loop devices still attached to the store:\n{loops}"
    );
    let left: Vec<_> = std::fs::read_dir(store.join("tmp"))
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{context}: scratch left in tmp/: {left:?}");
}

#[test]
fn disk_images_are_published_and_served_as_ironic_expects() {
    let v1 = fixture_tree("v1");
    let s = scratch("disk-ironic");
    let key = keygen(&s.join("keys"), "publisher");
    let store = s.join("store");
    let cases = [
        ("qcow2", "overcloud-full.qcow2", Table::Gpt, "disk-q"),
        ("raw", "overcloud-mbr.raw", Table::Mbr, "disk-r"),
    ];
    let mut published = Vec::new();
    for (format, name, table, id) in cases {
        let t = std::time::Instant::now();
        let (disk, rootfs) = make_disk(&s.join("build"), name, table, &v1);
        eprintln!("built {name} in {:.1?}", t.elapsed());
        let t = std::time::Instant::now();
        let rep = publish_json(&store, id, &key, &disk);
        eprintln!("published {name} in {:.1?}", t.elapsed());
        assert_released(&store, &format!("after publishing {name}"));
        let d = &rep["disks"][0];
        assert_eq!(d["name"], name, "{rep}");
        assert_eq!(d["format"], format, "{rep}");
        assert_eq!(d["sha256"].as_str(), Some(sha256_file(&disk).as_str()));
        published.push((format, name, id, disk, rootfs));
    }
    // index.json lists each image's disk.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("index.json")).expect("index"))
            .expect("index.json");
    for (format, name, id, disk, _) in &published {
        let e = index["images"]
            .as_array()
            .expect("images")
            .iter()
            .find(|e| e["id"] == *id)
            .unwrap_or_else(|| panic!("{id} not in index.json: {index}"));
        assert_eq!(e["disks"][0]["path"], format!("disks/{id}/{name}"), "{e}");
        assert_eq!(e["disks"][0]["format"], *format, "{e}");
        assert_eq!(
            e["disks"][0]["size"].as_u64(),
            Some(std::fs::metadata(disk).expect("disk").len())
        );
    }

    // Ironic: the conductor HEADs, IPA GETs (no Range) and checks the sum.
    let srv = Server::local(&store, &s.join("serve.log"));
    let http = client();
    for (format, name, id, disk, _) in &published {
        let url = format!("{}disks/{id}/{name}", srv.url);
        let head = http.head(&url).send().expect("HEAD");
        assert_eq!(head.status().as_u16(), 200, "HEAD {url}");
        let len: u64 = head
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("HEAD {url} without Content-Length"));
        assert_eq!(len, std::fs::metadata(disk).expect("disk").len());
        let sums_url = format!("{}disks/{id}/SHA256SUMS", srv.url);
        let sums = http.get(&sums_url).send().expect("GET sums");
        assert_eq!(sums.status().as_u16(), 200, "GET {sums_url}");
        let sums = sums.text().expect("sums text");
        let want = imageupd::publish::disk::parse_sha256sums(&sums)
            .into_iter()
            .find(|(_, n)| n == name)
            .unwrap_or_else(|| panic!("no line for {name} in SHA256SUMS:\n{sums}"))
            .0;
        let get = http.get(&url).send().expect("GET");
        assert_eq!(get.status().as_u16(), 200, "GET {url} must be exactly 200");
        let body = get.bytes().expect("body");
        assert_eq!(body.len() as u64, len, "GET length = HEAD Content-Length");
        assert_eq!(sha256_hex(&body), want, "GET {url}: sha256 vs SHA256SUMS");
        let dl = s.join(format!("downloaded-{name}"));
        std::fs::write(&dl, &body).expect("save download");
        let info: serde_json::Value = serde_json::from_str(&cmd(
            "qemu-img",
            ["info".as_ref(), "--output=json".as_ref(), dl.as_os_str()],
        ))
        .expect("qemu-img info json");
        assert_eq!(info["format"], *format, "qemu-img info on the download");
        std::fs::remove_file(&dl).expect("rm download");
    }

    // The ingested tree is v1: a node at v3 applies the disk image's tree;
    // the rsync oracle compares it with the v1 tree (mtimes in seconds, as
    // the disk keeps them), the metadata oracle with the disk's root
    // filesystem itself (nanoseconds, xattrs, hardlinks).
    for (_, name, id, _, rootfs) in &published {
        let root = s.join(format!("root-{id}"));
        make_root(&fixture_tree("v3"), &root, &key);
        apply(&store, id, &root, &[]).expect_ok();
        let ctx = format!("tree ingested from {name}");
        let o = oracle(&v1, &root);
        assert!(
            o.trim().is_empty(),
            "{ctx}: rsync oracle vs the v1 tree:\n{}",
            clip(&o, 60)
        );
        let mnt = RoMount::new(rootfs, &s.join(format!("mnt-{id}")));
        let d = meta_diff(&mnt.0, &root);
        assert!(
            d.is_empty(),
            "{ctx}: metadata oracle vs the disk's root filesystem:\n{}",
            clip(&d.join("\n"), 60)
        );
        drop(mnt);
        assert_eq!(
            image_id(&root).as_deref(),
            Some(*id),
            "{ctx}: /etc/image_id"
        );
        verify(&root, true).expect_ok();
        std::fs::remove_dir_all(&root).expect("rm root");
    }
}

#[test]
fn bad_disk_images_fail_cleanly_and_release_everything() {
    let s = scratch("disk-bad");
    let key = keygen(&s.join("keys"), "publisher");
    let store = s.join("store");
    // Seed the store so tmp/ exists and is checked from the start.
    publish(&store, "seed", Some(&key), None, &{
        let t = s.join("seed");
        std::fs::create_dir_all(t.join("etc")).expect("seed");
        t
    });

    // A disk whose only filesystem has no /etc and /usr.
    let t = s.join("boot-only");
    std::fs::create_dir_all(t.join("boot")).expect("boot");
    let fs = s.join("bootfs");
    cmd(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-d".as_ref(),
            t.as_os_str(),
            fs.as_os_str(),
            "8M".as_ref(),
        ],
    );
    let disk = s.join("noroot.raw");
    sh(&format!(
        "truncate -s 12M '{d}' && printf 'label: gpt\\n,8MiB,L\\n' | sfdisk --quiet '{d}' && \
         dd if='{f}' of='{d}' bs=1M seek=1 conv=notrunc status=none",
        d = disk.display(),
        f = fs.display()
    ));
    let out = imageupd(["publish", "--store"])
        .arg(&store)
        .args(["--id", "noroot", "--key"])
        .arg(&key.secret)
        .arg(&disk)
        .code(EXIT_SOURCE);
    assert!(
        out.all_output().contains("no /etc and /usr"),
        "the error must say why\n{}",
        out.describe()
    );
    assert_released(&store, "no root filesystem");
    assert!(!store.join("disks/noroot").exists());
    assert!(!store.join("images/noroot").exists());

    // A qcow2 with a backing file would make qemu read another file.
    let base = s.join("base.qcow2");
    cmd(
        "qemu-img",
        [
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            base.as_os_str(),
            "16M".as_ref(),
        ],
    );
    let overlay = s.join("overlay.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -F qcow2 -b '{}' '{}'",
        base.display(),
        overlay.display()
    ));
    let out = imageupd(["publish", "--store"])
        .arg(&store)
        .args(["--id", "overlay", "--key"])
        .arg(&key.secret)
        .arg(&overlay)
        .code(EXIT_UNTRUSTED);
    assert!(
        out.all_output().contains("backing file"),
        "{}",
        out.describe()
    );
    assert_released(&store, "qcow2 with a backing file");

    // A corrupt qcow2: qemu-img's own complaint reaches the user.
    let bad = s.join("corrupt.qcow2");
    let mut b = b"QFI\xfb".to_vec();
    b.extend(std::iter::repeat_n(0xA5u8, 4096));
    std::fs::write(&bad, b).expect("write corrupt qcow2");
    let out = imageupd(["publish", "--store"])
        .arg(&store)
        .args(["--id", "corrupt", "--key"])
        .arg(&key.secret)
        .arg(&bad)
        .run();
    assert_ne!(out.code(), Some(EXIT_OK), "{}", out.describe());
    assert!(
        out.all_output().contains("qemu-img") && out.all_output().contains("qcow2"),
        "the error must carry qemu-img's message\n{}",
        out.describe()
    );
    assert_released(&store, "corrupt qcow2");
}

// ---------------------------------------------------------------------------
// Packs.

/// A private copy of the shared store (hard links: replace files, never
/// rewrite them) without update deltas: these tests are about packs and
/// manifest frames (tests/delta.rs has deltas).
fn store_copy(dst: &Path) -> PathBuf {
    let store = shared_store();
    store.image("v1");
    store.image("v2");
    cmd(
        "cp",
        ["-al".as_ref(), store.dir.as_os_str(), dst.as_os_str()],
    );
    hide_deltas(dst);
    dst.to_path_buf()
}

fn apply_v2(url: &str, root: &Path) -> Out {
    imageupd(["apply", "--from", url, "--id", "v2", "--root"])
        .arg(root)
        .arg("--json")
        .run()
}

/// Where v2's largest object new since v1 sits: (digest, pack, offset, len).
fn largest_packed_new_object(store: &Path) -> (String, String, u64, u64) {
    use imageupd::format::pack;
    let st = imageupd::fs::store::Store::open(store).expect("store");
    let (m_stored, _) = st.read_manifest_raw("v2").expect("v2");
    let m = imageupd::format::codec::decode_manifest(&m_stored).expect("manifest");
    let (o_stored, _) = st.read_manifest_raw("v1").expect("v1");
    let old: std::collections::HashSet<_> =
        pack::object_order(&imageupd::format::codec::decode_manifest(&o_stored).expect("v1"))
            .into_iter()
            .map(|(d, _)| d)
            .collect();
    let idx = pack::PackIndex::decode(
        &std::fs::read(store.join("images/v2").join(pack::INDEX_NAME)).expect("index"),
    )
    .expect("decode index");
    let order = pack::object_order(&m);
    let map = idx
        .locate(&imageupd::format::manifest::Digest::of(&m_stored), &order)
        .expect("locate");
    let (d, l) = order
        .iter()
        .filter(|(d, _)| !old.contains(d))
        .map(|(d, _)| (d, map[d]))
        .max_by_key(|(_, l)| l.len)
        .expect("v2 has new objects");
    (d.to_hex(), l.pack.digest.to_hex(), l.offset, l.len)
}

#[test]
fn v1_to_v2_over_packs_takes_few_requests() {
    let store = shared_store();
    let v2 = store.image("v2");
    let s = scratch("pack-few");
    // The store's packs are consistent with its loose objects.
    let st = imageupd::fs::store::Store::open(&store.dir).expect("store");
    for id in ["v1", "v2"] {
        let n = imageupd::publish::pack::check_store(&st, id).expect("packs match loose objects");
        assert!(n > 1000, "{id}: only {n} objects");
    }
    let srv = Server::local(&store_copy(&s.join("store")), &s.join("serve.log"));

    // Before: the same store without pack indexes (an older publisher).
    let loose = store_copy(&s.join("loose"));
    for id in ["v1", "v2"] {
        std::fs::remove_file(loose.join("images").join(id).join("packs.idx.zst")).expect("rm idx");
    }
    let srv_loose = Server::local(&loose, &s.join("serve-loose.log"));
    let root_a = s.join("root-loose");
    node_at_v1(&root_a);
    let a = apply_v2(&srv_loose.url, &root_a).expect_ok();
    let da = a.json()["download"].clone();
    assert_applied(&v2, &root_a, "v2", "v1 -> v2 loose");

    let root = s.join("root");
    node_at_v1(&root);
    let out = apply_v2(&srv.url, &root).expect_ok();
    let d = out.json()["download"].clone();
    let fetch = out.json()["plan"]["fetch_objects"].as_u64().expect("plan");
    eprintln!(
        "v1 -> v2 over HTTP: loose {} requests / {} bytes; packs {} requests ({} ranges) / {} bytes; {fetch} objects",
        da["requests"], da["bytes"], d["requests"], d["pack_requests"], d["bytes"]
    );
    assert!(fetch > 100, "v1 -> v2 fetches only {fetch} objects");
    assert_eq!(d["packed_objects"].as_u64(), Some(fetch), "{d}");
    assert_eq!(d["objects"].as_u64(), Some(fetch), "{d}");
    let req = d["requests"].as_u64().expect("requests");
    assert!(req <= 30, "v1 -> v2 took {req} requests over packs: {d}");
    assert!(
        da["requests"].as_u64().unwrap_or(0) > fetch,
        "loose fetch should cost a request per object: {da}"
    );
    assert!(
        d["bytes"].as_u64().unwrap_or(u64::MAX) <= da["bytes"].as_u64().unwrap_or(0) * 11 / 10,
        "packs must not cost much more bytes than loose objects: {d} vs {da}"
    );
    assert_applied(&v2, &root, "v2", "v1 -> v2 over packs");
}

#[test]
fn tampered_pack_or_pack_index_is_refused() {
    let s = scratch("pack-tamper");
    let store = store_copy(&s.join("store"));
    let (obj, pack, offset, len) = largest_packed_new_object(&store);
    let p = store.join("packs").join(format!("{pack}.pack"));
    let mut bytes = std::fs::read(&p).expect("read pack");
    bytes[(offset + len / 2) as usize] ^= 0x40;
    std::fs::remove_file(&p).expect("unlink pack");
    std::fs::write(&p, &bytes).expect("write tampered pack");
    let srv = Server::local(&store, &s.join("serve.log"));
    let root = s.join("root");
    node_at_v1(&root);
    let before = snapshot_root(&root);
    let out = apply_v2(&srv.url, &root).expect_code(EXIT_UNTRUSTED);
    assert!(
        out.all_output().contains(&obj),
        "the error must name the object\n{}",
        out.describe()
    );
    assert_unchanged(&root, &before, "tampered pack");
    drop(srv);

    // A pack index altered after signing.
    let store2 = store_copy(&s.join("store2"));
    let ip = store2.join("images/v2/packs.idx.zst");
    let mut idx = std::fs::read(&ip).expect("read index");
    let mid = idx.len() / 2;
    idx[mid] ^= 1;
    std::fs::remove_file(&ip).expect("unlink index");
    std::fs::write(&ip, &idx).expect("write index");
    let srv = Server::local(&store2, &s.join("serve2.log"));
    let out = apply_v2(&srv.url, &root).expect_code(EXIT_UNTRUSTED);
    assert!(
        out.all_output().contains("pack index"),
        "{}",
        out.describe()
    );
    assert_unchanged(&root, &before, "tampered pack index");
}

#[test]
fn small_update_fetches_only_the_manifest_frames_it_lacks() {
    // v1 -> v3 changes one binary: the node reuses the frames of its current
    // manifest, fetches the few that differ, and the one object loose (the
    // pack index would cost more than it saves).
    let store = shared_store();
    let v3 = store.image("v3");
    let s = scratch("frames");
    let whole = std::fs::metadata(store.dir.join("images/v3/manifest.json.zst"))
        .expect("manifest")
        .len();
    let srv = Server::local(
        &shared_store_without_deltas(&s.join("store")),
        &s.join("serve.log"),
    );
    let root = s.join("root");
    node_at_v1(&root);
    let out = imageupd(["apply", "--from", &srv.url, "--id", "v3", "--root"])
        .arg(&root)
        .arg("--json")
        .ok();
    let d = out.json()["download"].clone();
    eprintln!("v1 -> v3 over HTTP: {d} (whole manifest {whole} bytes)");
    let bytes = d["bytes"].as_u64().expect("bytes");
    assert!(
        bytes < whole / 3,
        "v1 -> v3 downloaded {bytes} bytes; the manifest alone is {whole}: {d}"
    );
    assert!(d["requests"].as_u64().unwrap_or(99) <= 8, "{d}");
    assert_eq!(d["packed_objects"].as_u64(), Some(0), "{d}");
    assert_applied(&v3, &root, "v3", "v1 -> v3 with manifest frames");
}
