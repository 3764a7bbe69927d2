//! `imageupd provision --whole-disk` (part of tests/provision.rs): a disk
//! file provisioned by the tree path is published as a raw disk image
//! (its digest in the signed manifest) and written onto empty disk files,
//! from the store directory and over `imageupd serve`: byte-identical to
//! the source; with --configdrive, a config-2 partition is added at the
//! disk's end. Refusals (disk too small, untrusted and unsigned manifests,
//! an image without a disk, a qcow2 artifact, --scheme, no room for the
//! configdrive) leave the disk byte-identical (positive control: the good
//! inputs change it); a tampered artifact is caught at the end of the
//! stream with the first MiB still zero while the rest was written (the
//! first MiB goes last); a kill -9 mid-stream leaves the first MiB zero and
//! the re-run converges; a body that broke off is continued by a range
//! request only when answered 206.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::common::http;
use super::common::serve::Server;
use super::common::*;
use super::{Job, MIB};

/// Size of the source disk, bytes: the smallest the tree path's scheme fits.
const SRC_BYTES: u64 = 512 * MIB;
/// Id of the image published from the provisioned disk.
const ID: &str = "v1-disk";
/// Its published file name.
const FILE: &str = "node.raw";

/// The source disk (v1 provisioned by the tree path), the store it is
/// published in (signed) and the publisher's key.
struct Published {
    _s: Scratch,
    disk: PathBuf,
    store: PathBuf,
    key: Key,
    sha256: String,
}

fn published() -> &'static Published {
    static P: OnceLock<Published> = OnceLock::new();
    P.get_or_init(|| {
        let j = Job::new("whole-src", SRC_BYTES);
        let t = Instant::now();
        j.cmd("v1", &j.disk, &[]).ok();
        eprintln!("provisioned the source disk in {:.1?}", t.elapsed());
        let s = scratch("whole-store");
        let disk = s.join(FILE);
        cmd("cp", [j.disk.as_os_str(), disk.as_os_str()]);
        let key = keygen(&s.join("keys"), "disk-publisher");
        let store = s.join("store");
        let t = Instant::now();
        publish(&store, ID, Some(&key), None, &disk);
        eprintln!("published the disk image in {:.1?}", t.elapsed());
        let sha256 = sha256_file(&disk);
        Published {
            _s: s,
            disk,
            store,
            key,
            sha256,
        }
    })
}

/// An empty disk file of `size` bytes and a trusted-keys directory with
/// the disk publisher's key.
struct Target {
    s: Scratch,
    disk: PathBuf,
    keys: PathBuf,
}

impl Target {
    #[track_caller]
    fn new(name: &str, size: u64) -> Target {
        let p = published();
        let s = scratch(name);
        let disk = s.join("target.raw");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(size))
            .expect("create target disk");
        let keys = s.join("trusted.d");
        std::fs::create_dir_all(&keys).expect("keys dir");
        std::fs::copy(&p.key.public, keys.join("disk-publisher.pub")).expect("copy key");
        Target { s, disk, keys }
    }

    /// `imageupd provision --whole-disk --from FROM --id ID --disk TARGET --trusted-keys KEYS EXTRA...`.
    fn cmd(&self, from: impl AsRef<std::ffi::OsStr>, id: &str, extra: &[&str]) -> Run {
        imageupd(["provision", "--whole-disk", "--from"])
            .arg(from)
            .args(["--id", id, "--disk"])
            .arg(&self.disk)
            .arg("--trusted-keys")
            .arg(&self.keys)
            .args(extra)
            .timeout(Duration::from_secs(600))
    }

    /// Old content at both ends (a wipe or an early first MiB would show).
    fn fill_ends(&self) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.disk)
            .expect("open target");
        let size = f.metadata().expect("stat").len();
        let old: Vec<u8> = b"old\n"
            .iter()
            .copied()
            .cycle()
            .take(MIB as usize)
            .collect();
        for at in [0, size - MIB] {
            f.write_all_at(&old, at).expect("write old content");
        }
    }
}

/// The first `n` bytes of a file.
fn head(p: &Path, n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read head");
    b
}

/// A copy of the published store sharing every file by hard link (cheap;
/// files are then replaced or removed, never written in place).
fn linked_store(name: &str) -> (Scratch, PathBuf) {
    let s = scratch(name);
    let dst = s.join("store");
    cmd(
        "cp",
        [
            std::ffi::OsStr::new("-al"),
            published().store.as_os_str(),
            dst.as_os_str(),
        ],
    );
    (s, dst)
}

#[test]
fn whole_disk_from_the_store_and_over_serve_is_byte_identical() {
    let p = published();
    // The signed manifest records the artifact (and the publish report's
    // SHA256SUMS agrees).
    let m = read_manifest(&p.store, ID);
    assert_eq!(m["disk"]["file"], FILE, "{}", m["disk"]);
    assert_eq!(m["disk"]["format"], "raw");
    assert_eq!(m["disk"]["size"], SRC_BYTES);
    assert_eq!(m["disk"]["sha256"], p.sha256.as_str());
    let sums = std::fs::read_to_string(p.store.join(format!("disks/{ID}/SHA256SUMS")))
        .expect("SHA256SUMS");
    assert_eq!(sums, format!("{}  {FILE}\n", p.sha256));
    // From the store directory.
    let t = Target::new("whole-local", SRC_BYTES);
    let t0 = Instant::now();
    let out = t.cmd(&p.store, ID, &["--json"]).ok();
    eprintln!("whole disk from the store in {:.1?}", t0.elapsed());
    let r = out.json();
    assert_eq!(r["result"], "provisioned", "{}", out.describe());
    assert_eq!(r["whole_disk"]["sha256"], p.sha256.as_str());
    assert!(r["signed_by"].is_string(), "{r}");
    assert_eq!(sha256_file(&t.disk), p.sha256, "not byte-identical");
    assert!(
        out.stderr.contains("\"step\":\"committed\""),
        "{}",
        out.stderr
    );
    // Over `imageupd serve`, onto a larger disk: the image's bytes, then
    // the rest of the disk as it was (zeros; its last MiB wiped).
    let srv = Server::local(&p.store, &t.s.join("serve.log"));
    let big = Target::new("whole-http", SRC_BYTES + 8 * MIB);
    let out = big.cmd(&srv.url, ID, &["--json"]).ok();
    let r = out.json();
    assert!(
        r["download"]["bytes"].as_u64().unwrap_or(0) >= SRC_BYTES,
        "{r}"
    );
    let gets: Vec<String> = srv
        .gets()
        .into_iter()
        .filter(|l| l.contains(FILE))
        .collect();
    assert_eq!(gets.len(), 1, "one GET of the disk image: {gets:?}");
    sh(&format!("truncate -s {SRC_BYTES} {}", big.disk.display()));
    assert_eq!(
        sha256_file(&big.disk),
        p.sha256,
        "over HTTP: not byte-identical"
    );
}

#[test]
fn whole_disk_refusals_leave_the_disk_byte_identical() {
    let p = published();
    let t = Target::new("whole-bad", SRC_BYTES);
    t.fill_ends();
    let before = sha256_file(&t.disk);
    // A disk smaller than the image.
    let small = Target::new("whole-small", SRC_BYTES - MIB);
    small.fill_ends();
    let small_before = sha256_file(&small.disk);
    let out = small.cmd(&p.store, ID, &[]).code(EXIT_PREFLIGHT);
    assert!(out.stderr.contains("needs"), "{}", out.describe());
    assert_eq!(
        sha256_file(&small.disk),
        small_before,
        "too small: disk changed"
    );
    // An image published from a tree has no disk artifact.
    let shared = shared_store();
    shared.image("v1");
    std::fs::copy(&shared.key.public, t.keys.join("publisher.pub")).expect("key");
    let out = t.cmd(&shared.dir, "v1", &[]).code(EXIT_SOURCE);
    assert!(
        out.stderr.contains("not published from a disk image"),
        "{}",
        out.describe()
    );
    // --scheme is refused with --whole-disk.
    let scheme = t.s.join("scheme.toml");
    std::fs::write(&scheme, super::SCHEME).expect("scheme");
    let out = t
        .cmd(&p.store, ID, &["--scheme", &scheme.display().to_string()])
        .code(EXIT_USAGE);
    assert!(out.stderr.contains("--scheme"), "{}", out.describe());
    // --configdrive on a disk with no room for it after the image.
    std::fs::write(t.s.join("drive.toml"), super::DRIVE).expect("drive");
    let drive = t.s.join("drive.toml").display().to_string();
    let out = t
        .cmd(&p.store, ID, &["--configdrive", &drive])
        .code(EXIT_PREFLIGHT);
    assert!(out.stderr.contains("no room"), "{}", out.describe());
    // Signed by a key the node does not trust.
    let untrusted = Target::new("whole-untrusted", SRC_BYTES);
    std::fs::remove_file(untrusted.keys.join("disk-publisher.pub")).expect("rm key");
    let other = keygen(&untrusted.s.join("other"), "other");
    std::fs::copy(&other.public, untrusted.keys.join("other.pub")).expect("other key");
    untrusted.fill_ends();
    let u_before = sha256_file(&untrusted.disk);
    let out = untrusted.cmd(&p.store, ID, &[]).code(EXIT_UNTRUSTED);
    assert!(out.stderr.contains("signature"), "{}", out.describe());
    assert_eq!(
        sha256_file(&untrusted.disk),
        u_before,
        "untrusted: disk changed"
    );
    // Unsigned: the signature removed from a copy of the store.
    let (_s, unsigned) = linked_store("whole-unsigned");
    std::fs::remove_file(unsigned.join(format!("images/{ID}/manifest.json.zst.sig")))
        .expect("rm sig");
    let out = t.cmd(&unsigned, ID, &[]).code(EXIT_UNTRUSTED);
    assert!(out.stderr.contains("not signed"), "{}", out.describe());
    assert_eq!(sha256_file(&t.disk), before, "refusals changed the disk");
    // Positive control: the good inputs change the same disk.
    t.cmd(&p.store, ID, &[]).ok();
    assert_eq!(sha256_file(&t.disk), p.sha256);
}

#[test]
fn whole_disk_qcow2_artifact_refused() {
    let p = published();
    let s = scratch("whole-qcow2");
    let q = s.join("node.qcow2");
    cmd(
        "qemu-img",
        [
            std::ffi::OsStr::new("convert"),
            std::ffi::OsStr::new("-f"),
            std::ffi::OsStr::new("raw"),
            std::ffi::OsStr::new("-O"),
            std::ffi::OsStr::new("qcow2"),
            p.disk.as_os_str(),
            q.as_os_str(),
        ],
    );
    let store = s.join("store");
    publish(&store, "v1-qcow2", Some(&p.key), None, &q);
    assert_eq!(read_manifest(&store, "v1-qcow2")["disk"]["format"], "qcow2");
    let t = Target::new("whole-qcow2-t", SRC_BYTES);
    t.fill_ends();
    let before = sha256_file(&t.disk);
    let out = t.cmd(&store, "v1-qcow2", &[]).code(EXIT_USAGE);
    assert!(out.stderr.contains("raw images only"), "{}", out.describe());
    assert_eq!(sha256_file(&t.disk), before, "qcow2: disk changed");
}

#[test]
fn whole_disk_tampered_artifact_caught_with_the_first_mib_unwritten() {
    let p = published();
    let (_s, store) = linked_store("whole-tampered");
    // One byte flipped, in a real copy (not the shared hard link).
    let art = store.join(format!("disks/{ID}/{FILE}"));
    std::fs::remove_file(&art).expect("unlink");
    cmd("cp", [p.disk.as_os_str(), art.as_os_str()]);
    let at = 300 * MIB + 12345;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&art)
            .expect("open the copy");
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).expect("read");
        f.write_all_at(&[b[0] ^ 0x01], at).expect("flip");
    }
    assert_ne!(sha256_file(&art), p.sha256, "the flip changed nothing");
    assert!(
        head(&p.disk, MIB as usize).iter().any(|&b| b != 0),
        "the image's first MiB is all zeros: the check below proves nothing"
    );
    for http in [false, true] {
        let what = if http { "http" } else { "local" };
        let t = Target::new(&format!("whole-tampered-{what}"), SRC_BYTES);
        t.fill_ends();
        let srv = http.then(|| Server::local(&store, &t.s.join("serve.log")));
        let src = match &srv {
            Some(s) => s.url.clone(),
            None => store.display().to_string(),
        };
        let out = t.cmd(&src, ID, &[]).code(EXIT_UNTRUSTED);
        assert!(
            out.stderr.contains("digest mismatch")
                && out.stderr.contains("first MiB was not written"),
            "{what}: {}",
            out.describe()
        );
        assert!(
            head(&t.disk, MIB as usize).iter().all(|&b| b == 0),
            "{what}: the first MiB was written before the digest was checked"
        );
        // Positive control: the rest was streamed (from MiB 1 on, the
        // target holds the tampered artifact's bytes).
        let rest = sh(&format!(
            "cmp -i {MIB} {} {} || true",
            t.disk.display(),
            art.display()
        ));
        assert!(rest.trim().is_empty(), "{what}: the rest differs: {rest}");
    }
}

#[test]
fn whole_disk_killed_mid_stream_never_boots_and_rerun_converges() {
    let p = published();
    let t = Target::new("whole-kill", SRC_BYTES);
    t.fill_ends();
    let srv = Server::local(&p.store, &t.s.join("serve.log"));
    // Half-way through the stream (one pass per MiB), then near the end.
    for n in [SRC_BYTES / MIB / 2, SRC_BYTES / MIB - 1] {
        let point = format!("whole-disk-stream:{n}");
        let out = t.cmd(&srv.url, ID, &[]).env("IMAGEUPD_FAULT", &point).run();
        assert!(out.signal().is_some(), "{point}: {}", out.describe());
        assert!(
            head(&t.disk, MIB as usize).iter().all(|&b| b == 0),
            "{point}: the killed run left a first MiB"
        );
        assert!(
            super::sfdisk_json(&t.disk).is_none(),
            "{point}: a table is there"
        );
    }
    let r = t.cmd(&srv.url, ID, &["--json"]).ok().json();
    assert_eq!(r["result"], "provisioned", "{r}");
    assert_eq!(
        sha256_file(&t.disk),
        p.sha256,
        "the re-run did not converge"
    );
    assert!(super::sfdisk_json(&t.disk).is_some());
}

#[test]
fn whole_disk_with_a_configdrive_at_the_end_of_the_disk() {
    let p = published();
    let size = SRC_BYTES + 128 * MIB;
    let t = Target::new("whole-drive", size);
    t.fill_ends();
    std::fs::write(t.s.join("drive.toml"), super::DRIVE).expect("drive");
    let drive = t.s.join("drive.toml").display().to_string();
    let out = t
        .cmd(&p.store, ID, &["--json", "--configdrive", &drive])
        .ok();
    let r = out.json();
    let cd = &r["configdrive"];
    assert_eq!(cd["name"], "config-2", "{}", out.describe());
    // The last 64 MiB aligned before the backup GPT (the last MiB).
    let start = super::u(&cd["start_bytes"]);
    assert_eq!(start, size - MIB - 64 * MIB, "{cd}");
    // sfdisk reads the image's table plus the new entry, the backup GPT at
    // the disk's end, and finds nothing wrong.
    let table = super::sfdisk_json(&t.disk).expect("a table");
    let src = super::sfdisk_json(&p.disk).expect("the image's table");
    let parts = table["partitiontable"]["partitions"]
        .as_array()
        .expect("parts");
    let src_parts = src["partitiontable"]["partitions"]
        .as_array()
        .expect("parts");
    assert_eq!(parts.len(), src_parts.len() + 1, "{table}");
    let key = |v: &serde_json::Value| {
        (
            v["start"].clone(),
            v["size"].clone(),
            v["uuid"].clone(),
            v["name"].clone(),
        )
    };
    assert_eq!(
        parts[..src_parts.len()].iter().map(key).collect::<Vec<_>>(),
        src_parts.iter().map(key).collect::<Vec<_>>()
    );
    let last = &parts[src_parts.len()];
    assert_eq!(super::u(&last["start"]) * 512, start, "{last}");
    assert_eq!(last["name"], "config-2");
    assert_eq!(
        super::u(&table["partitiontable"]["lastlba"]),
        size / 512 - 34,
        "{table}"
    );
    cmd(
        "sfdisk",
        [std::ffi::OsStr::new("--verify"), t.disk.as_os_str()],
    );
    // The drive: vfat labelled config-2 with the inputs (mtools).
    let l = super::LoopDev::new(&t.disk, start, Some(64 * MIB), 512);
    assert_eq!(super::blkid(&l.0, "LABEL"), "config-2");
    assert_eq!(super::blkid(&l.0, "TYPE"), "vfat");
    let meta = cmd(
        "mtype",
        [
            std::ffi::OsStr::new("-i"),
            l.0.as_os_str(),
            std::ffi::OsStr::new("::/openstack/latest/meta_data.json"),
        ],
    );
    assert!(
        meta.contains("4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11"),
        "{meta}"
    );
    drop(l);
    // Between the first MiB and the image's old backup GPT: the image.
    let n = SRC_BYTES - MIB - 33 * 512;
    let diff = sh(&format!(
        "cmp -n {n} -i {MIB} {} {} || true",
        t.disk.display(),
        p.disk.display()
    ));
    assert!(diff.trim().is_empty(), "the image's bytes differ: {diff}");
}

/// A cut-off first GET of the small disk image, every other request served.
fn cut_first(path: &str, n: u32) -> http::Fault {
    if path.ends_with("small.raw") && n == 1 {
        http::Fault::Cut
    } else {
        http::Fault::None
    }
}

#[test]
fn whole_disk_stream_broken_off_is_continued_by_a_checked_range_request() {
    let p = published();
    let s = scratch("whole-resume");
    // A small disk image: one ext4 filesystem, no table.
    let tree = s.join("tree");
    for d in ["etc", "usr/bin"] {
        std::fs::create_dir_all(tree.join(d)).expect("tree");
    }
    std::fs::write(tree.join("etc/hostname"), "small\n").expect("file");
    let img = s.join("small.raw");
    cmd(
        "mkfs.ext4",
        [
            std::ffi::OsStr::new("-q"),
            std::ffi::OsStr::new("-F"),
            std::ffi::OsStr::new("-d"),
            tree.as_os_str(),
            img.as_os_str(),
            std::ffi::OsStr::new("16M"),
        ],
    );
    let store = s.join("store");
    publish(&store, "small", Some(&p.key), None, &img);
    let sha = sha256_file(&img);
    // A server that honours Range: the broken-off body is continued.
    let srv = http::FileServer::over(&store)
        .ranges()
        .fault(cut_first)
        .start();
    let t = Target::new("whole-resume-ok", 16 * MIB);
    let out = t.cmd(&srv.url, "small", &["--json"]).ok();
    let r = out.json();
    assert_eq!(r["download"]["resumed"], 1, "{}", out.describe());
    assert_eq!(sha256_file(&t.disk), sha, "the continued stream differs");
    assert_eq!(srv.requests().get("/disks/small/small.raw"), Some(&2));
    // Control: a server that answers the range request with the whole file
    // (200): not spliced in, the run fails with the first MiB zero.
    let plain = http::FileServer::over(&store).fault(cut_first).start();
    let t = Target::new("whole-resume-200", 16 * MIB);
    t.fill_ends();
    let out = t.cmd(&plain.url, "small", &[]).code(EXIT_SOURCE);
    assert!(out.stderr.contains("not continuing"), "{}", out.describe());
    assert!(head(&t.disk, MIB as usize).iter().all(|&b| b == 0));
}
