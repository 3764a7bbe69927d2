//! `imageupd provision` (issue 12) on disk image files and loop devices:
//! the plan (`--dry-run --json`) against expected offsets; a v1 node
//! provisioned from the signed store onto a file disk, checked by
//! independent tools (sfdisk's table, blkid's UUIDs, the configdrive
//! copied out with mtools, the oracles on the root), "nothing to do" on a
//! re-run and an update in place to v2 the next day; the same on a
//! 4096-byte-sector loop device; kill -9 at fault points and at random
//! times, each leaving a disk without a table, and a re-run converging;
//! bad inputs refused with the disk byte-identical (positive control: the
//! same disk with good inputs changes). `--whole-disk`: see
//! tests/provision/whole_disk.rs.

mod common;
#[path = "provision/whole_disk.rs"]
mod whole_disk;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// MiB in bytes.
const MIB: u64 = 1 << 20;

/// A BIOS-style scheme for the kernel-less v1 fixture: every role except
/// the ESP (the UEFI loader needs a kernel; tests/provision_vm.rs boots
/// one), a configdrive at the end.
const SCHEME: &str = r#"
firmware = "bios"
seed = "test-node"
[[disk]]
name = "vda"
[[disk.partition]]
role = "bios-boot"
[[disk.partition]]
role = "swap"
size = "32MiB"
[[disk.partition]]
role = "root"
min = "400MiB"
[[disk.partition]]
role = "data"
mount = "/srv"
min = "16MiB"
max = "64MiB"
[[disk.partition]]
role = "configdrive"
size = "16MiB"
"#;

/// Configdrive inputs.
const DRIVE: &str = r##"
uuid = "4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11"
hostname = "node-01"
public_keys = { default = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAA test" }
[[link]]
id = "eth0"
mac = "52:54:00:12:34:56"
[[network]]
link = "eth0"
address = "10.0.2.15/24"
gateway = "10.0.2.2"
dns = ["10.0.2.3"]
[[user_data]]
type = "text/cloud-config"
content = "#cloud-config\nlocale: false\n"
"##;

/// A test disk and the files of one provisioning job.
struct Job {
    s: Scratch,
    disk: PathBuf,
    scheme: PathBuf,
    drive: PathBuf,
    keys: PathBuf,
}

impl Job {
    #[track_caller]
    fn new(name: &str, size: u64) -> Job {
        let s = scratch(name);
        let disk = s.join("disk.raw");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(size))
            .expect("create disk file");
        let scheme = s.join("scheme.toml");
        std::fs::write(&scheme, SCHEME).expect("write scheme");
        let drive = s.join("drive.toml");
        std::fs::write(&drive, DRIVE).expect("write configdrive");
        let keys = s.join("trusted.d");
        std::fs::create_dir_all(&keys).expect("keys dir");
        let store = shared_store();
        std::fs::copy(&store.key.public, keys.join("publisher.pub")).expect("copy key");
        Job {
            s,
            disk,
            scheme,
            drive,
            keys,
        }
    }

    /// `imageupd provision --from STORE --id ID --scheme --disk --configdrive --trusted-keys EXTRA...`.
    fn cmd(&self, id: &str, disk: &Path, extra: &[&str]) -> Run {
        let store = shared_store();
        store.image(id);
        imageupd(["provision", "--from"])
            .arg(&store.dir)
            .args(["--id", id, "--scheme"])
            .arg(&self.scheme)
            .arg("--disk")
            .arg(disk)
            .arg("--configdrive")
            .arg(&self.drive)
            .arg("--trusted-keys")
            .arg(&self.keys)
            .args(extra)
            .timeout(Duration::from_secs(600))
    }
}

/// A loop device over a byte range of a file, detached when dropped.
struct LoopDev(PathBuf);

impl LoopDev {
    #[track_caller]
    fn new(file: &Path, offset: u64, size: Option<u64>, sector: u64) -> LoopDev {
        let mut a: Vec<String> = vec![
            "--find".into(),
            "--show".into(),
            "--offset".into(),
            offset.to_string(),
            "--sector-size".into(),
            sector.to_string(),
        ];
        if let Some(s) = size {
            a.push("--sizelimit".into());
            a.push(s.to_string());
        }
        a.push(file.display().to_string());
        LoopDev(PathBuf::from(cmd("losetup", &a).trim()))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let ok = Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status()
            .map(|s| s.success());
        if ok.ok() != Some(true) {
            eprintln!("could not detach {}", self.0.display());
        }
    }
}

/// A filesystem mounted from a loop device, unmounted when dropped.
struct Mounted {
    at: PathBuf,
    _dev: LoopDev,
}

impl Mounted {
    #[track_caller]
    fn new(dev: LoopDev, at: &Path) -> Mounted {
        std::fs::create_dir_all(at).expect("mount point");
        cmd("mount", [dev.0.as_os_str(), at.as_os_str()]);
        Mounted {
            at: at.to_path_buf(),
            _dev: dev,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.at)
            .status()
            .map(|s| s.success());
        if ok.ok() != Some(true) {
            eprintln!("could not unmount {}", self.at.display());
        }
    }
}

/// The partition table as sfdisk reads it (None: no table).
fn sfdisk_json(disk: &Path) -> Option<serde_json::Value> {
    let o = Command::new("sfdisk")
        .arg("--json")
        .arg(disk)
        .output()
        .expect("run sfdisk");
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

/// blkid's low-level probe of one value of a device.
fn blkid(dev: &Path, tag: &str) -> String {
    let o = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", tag])
        .arg(dev)
        .output()
        .expect("run blkid");
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The partition of a role in the `--dry-run --json`/report plan.
fn part<'a>(plan: &'a serde_json::Value, role: &str) -> &'a serde_json::Value {
    plan["disks"][0]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["role"] == role)
        .unwrap_or_else(|| panic!("no {role} partition in {plan}"))
}

fn u(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// sha256 of a whole file.
fn digest(p: &Path) -> String {
    sha256_file(p)
}

/// Check a provisioned disk by independent tools: the table (sfdisk) has
/// the planned partitions, each filesystem the planned UUID (blkid), the
/// configdrive the inputs (mtools), fstab the UUIDs, the root equals the
/// image (oracles). `sector` is the disk's logical sector size.
#[track_caller]
fn check_disk(
    dev: &Path,
    file: &Path,
    sector: u64,
    plan: &serde_json::Value,
    image: &Path,
    mnt: &Path,
    host: &str,
) {
    let t = sfdisk_json(dev).unwrap_or_else(|| panic!("no partition table on {}", dev.display()));
    let parts = t["partitiontable"]["partitions"]
        .as_array()
        .expect("sfdisk partitions");
    let planned = plan["disks"][0]["partitions"]
        .as_array()
        .expect("plan partitions");
    assert_eq!(parts.len(), planned.len(), "sfdisk: {t}");
    assert_eq!(t["partitiontable"]["label"], "gpt", "{t}");
    assert_eq!(u(&t["partitiontable"]["sectorsize"]), sector, "{t}");
    for (got, want) in parts.iter().zip(planned) {
        assert_eq!(
            u(&got["start"]) * sector,
            u(&want["start_bytes"]),
            "start: {got} vs {want}"
        );
        assert_eq!(
            u(&got["size"]) * sector,
            u(&want["size_bytes"]),
            "size: {got} vs {want}"
        );
        assert_eq!(
            got["uuid"].as_str().map(str::to_lowercase),
            want["part_uuid"].as_str().map(str::to_lowercase),
            "{got}"
        );
        if let Some(fs_uuid) = want["fs_uuid"].as_str() {
            let l = LoopDev::new(
                file,
                u(&want["start_bytes"]),
                Some(u(&want["size_bytes"])),
                sector,
            );
            assert_eq!(
                blkid(&l.0, "UUID").to_lowercase(),
                fs_uuid.to_lowercase(),
                "{want}"
            );
        }
    }
    let cd = part(plan, "configdrive");
    let l = LoopDev::new(
        file,
        u(&cd["start_bytes"]),
        Some(u(&cd["size_bytes"])),
        sector,
    );
    assert_eq!(blkid(&l.0, "LABEL"), "config-2");
    assert_eq!(blkid(&l.0, "TYPE"), "vfat");
    for v in ["latest", "2012-08-10"] {
        let meta = cmd(
            "mtype",
            [
                OsStr::new("-i"),
                l.0.as_os_str(),
                OsStr::new(&format!("::/openstack/{v}/meta_data.json")),
            ],
        );
        let m: serde_json::Value =
            serde_json::from_str(&meta).unwrap_or_else(|e| panic!("meta_data.json {e}: {meta}"));
        assert_eq!(m["uuid"], "4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11");
        assert_eq!(m["hostname"], host);
        let net = cmd(
            "mtype",
            [
                OsStr::new("-i"),
                l.0.as_os_str(),
                OsStr::new(&format!("::/openstack/{v}/network_data.json")),
            ],
        );
        let n: serde_json::Value = serde_json::from_str(&net).expect("network_data.json");
        assert_eq!(n["networks"][0]["ip_address"], "10.0.2.15");
        let user = cmd(
            "mtype",
            [
                OsStr::new("-i"),
                l.0.as_os_str(),
                OsStr::new(&format!("::/openstack/{v}/user_data")),
            ],
        );
        assert!(user.contains("Content-Type: text/cloud-config"), "{user}");
    }
    drop(l);
    let root = part(plan, "root");
    let m = Mounted::new(
        LoopDev::new(
            file,
            u(&root["start_bytes"]),
            Some(u(&root["size_bytes"])),
            sector,
        ),
        mnt,
    );
    assert_converged(image, &m.at, "provisioned root");
    let fstab = std::fs::read_to_string(m.at.join("etc/fstab")).expect("fstab");
    let root_uuid = root["fs_uuid"].as_str().expect("root uuid");
    assert!(
        fstab.contains(&format!("UUID={root_uuid} / ext4 ")),
        "{fstab}"
    );
    assert!(fstab.contains(" none swap sw 0 0"), "{fstab}");
    assert!(fstab.contains(" /srv ext4 "), "{fstab}");
    assert_eq!(image_id(&m.at).as_deref(), Some("v1"));
    assert!(m.at.join("etc/imageupd/trusted.d/publisher.pub").is_file());
}

#[test]
fn dry_run_plans_and_changes_nothing() {
    let j = Job::new("prov-dry", 1 << 30);
    let before = digest(&j.disk);
    let out = j.cmd("v1", &j.disk, &["--dry-run", "--json"]).ok();
    let p = out.json();
    assert_eq!(p["result"], "planned");
    let plan = &p["plan"];
    // 1 GiB GPT: bios-boot at 1 MiB, swap, root grows, data capped at 64
    // MiB, the configdrive ends at 1023 MiB (the backup GPT's MiB).
    let spans: Vec<(u64, u64)> = plan["disks"][0]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|x| (u(&x["start_bytes"]) / MIB, u(&x["size_bytes"]) / MIB))
        .collect();
    assert_eq!(
        spans,
        vec![(1, 1), (2, 32), (34, 909), (943, 64), (1007, 16)],
        "{plan}"
    );
    assert_eq!(part(plan, "configdrive")["label"], "config-2");
    assert_eq!(digest(&j.disk), before, "--dry-run changed the disk");
    assert!(sfdisk_json(&j.disk).is_none());
}

#[test]
fn provision_file_disk_then_nothing_to_do_then_update_in_place() {
    let j = Job::new("prov-file", 1 << 30);
    let t = Instant::now();
    let out = j.cmd("v1", &j.disk, &["--json"]).ok();
    eprintln!("provisioned v1 in {:.1?}", t.elapsed());
    let r = out.json();
    assert_eq!(r["result"], "provisioned", "{}", out.describe());
    assert_eq!(r["apply"]["result"], "applied");
    let image = fixture_tree("v1");
    check_disk(
        &j.disk,
        &j.disk,
        512,
        &r["plan"],
        &image,
        &j.s.join("mnt"),
        "node-01",
    );
    // Same inputs again: nothing to do, the disk byte-identical.
    let before = digest(&j.disk);
    let again = j.cmd("v1", &j.disk, &["--json"]).ok();
    assert_eq!(
        again.json()["result"],
        "nothing-to-do",
        "{}",
        again.describe()
    );
    assert_eq!(
        digest(&j.disk),
        before,
        "the nothing-to-do run changed the disk"
    );
    // The next day: `apply` updates the node's root in place to v2.
    let root = part(&r["plan"], "root");
    let m = Mounted::new(
        LoopDev::new(
            &j.disk,
            u(&root["start_bytes"]),
            Some(u(&root["size_bytes"])),
            512,
        ),
        &j.s.join("mnt2"),
    );
    // What cloud-init leaves after the first boot (its state, the network
    // config it rendered, the default user it made), and, as the control,
    // node-local files no preserve pattern covers.
    let first_boot: &[(&str, &str)] = &[
        (
            "var/lib/cloud/data/instance-id",
            "4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11\n",
        ),
        (
            "var/lib/cloud/instances/4bd5c5a1/sem/config_scripts_user",
            "done\n",
        ),
        ("etc/network/interfaces.d/50-cloud-init", "auto eth0\n"),
        (
            "etc/sudoers.d/90-cloud-init-users",
            "debian ALL=(ALL) NOPASSWD:ALL\n",
        ),
    ];
    for (rel, text) in first_boot {
        let f = m.at.join(rel);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, text).unwrap();
    }
    let passwd = m.at.join("etc/passwd");
    let mut users = std::fs::read_to_string(&passwd).expect("passwd");
    users.push_str("debian:x:1000:1000:Debian:/home/debian:/bin/bash\n");
    std::fs::write(&passwd, &users).unwrap();
    for control in [
        "var/lib/not-cloud/state",
        "etc/network/interfaces.d/60-local",
    ] {
        let f = m.at.join(control);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, "node-local\n").unwrap();
    }
    let store = shared_store();
    let v2 = store.image("v2");
    apply(&store.dir, "v2", &m.at, &[]).expect_ok();
    for (rel, text) in first_boot {
        assert_eq!(
            std::fs::read_to_string(m.at.join(rel)).ok().as_deref(),
            Some(*text),
            "the update in place lost cloud-init's {rel}"
        );
    }
    assert_eq!(std::fs::read_to_string(&passwd).expect("passwd"), users);
    for control in [
        "var/lib/not-cloud/state",
        "etc/network/interfaces.d/60-local",
    ] {
        assert!(
            !m.at.join(control).exists(),
            "control: {control} (not preserved) survived: the check above proves nothing"
        );
    }
    assert_converged_except(
        &v2,
        &m.at,
        CLOUD_INIT_KEPT,
        "apply onto the provisioned root",
    );
    assert_eq!(image_id(&m.at).as_deref(), Some("v2"));
    let v = verify(&m.at, true);
    assert_eq!(v.code(), Some(EXIT_OK), "{}", v.describe());
    assert!(std::fs::read_to_string(m.at.join("etc/fstab"))
        .expect("fstab")
        .contains("UUID="));
}

#[test]
fn provision_4096_byte_sector_disk() {
    let j = Job::new("prov-4k", 1 << 30);
    let dev = LoopDev::new(&j.disk, 0, None, 4096);
    let out = j.cmd("v1", &dev.0, &["--json"]).ok();
    let r = out.json();
    assert_eq!(
        r["plan"]["disks"][0]["sector_size"],
        4096,
        "{}",
        out.describe()
    );
    check_disk(
        &dev.0,
        &j.disk,
        4096,
        &r["plan"],
        &fixture_tree("v1"),
        &j.s.join("mnt"),
        "node-01",
    );
}

/// After a crash: the disk either has no partition table (it does not
/// boot) or is complete (the oracles agree).
#[track_caller]
fn assert_never_partial(j: &Job, plan: &serde_json::Value, what: &str) {
    if sfdisk_json(&j.disk).is_some() {
        let root = part(plan, "root");
        let m = Mounted::new(
            LoopDev::new(
                &j.disk,
                u(&root["start_bytes"]),
                Some(u(&root["size_bytes"])),
                512,
            ),
            &j.s.join("mnt-crash"),
        );
        assert_converged(
            &fixture_tree("v1"),
            &m.at,
            &format!("{what}: a table is there, so the root must be whole"),
        );
        assert!(
            m.at.join("etc/fstab").is_file(),
            "{what}: table before fstab"
        );
    }
}

#[test]
fn killed_at_any_point_never_boots_partial_and_rerun_converges() {
    let j = Job::new("prov-kill", 1 << 30);
    let plan = j.cmd("v1", &j.disk, &["--dry-run", "--json"]).ok().json()["plan"].clone();
    // Deterministic crashes after each step (before its marker).
    let points: Vec<String> = imageupd(["fault-points"])
        .ok()
        .stdout
        .lines()
        .filter(|l| l.starts_with("provision-"))
        .map(str::to_string)
        .collect();
    assert!(points.len() >= 7, "{points:?}");
    let mut crashes = 0;
    for p in &points {
        let out = j.cmd("v1", &j.disk, &[]).env("IMAGEUPD_FAULT", p).run();
        if out.code() == Some(EXIT_OK) {
            // provision-done is after the last step: never reached twice.
            continue;
        }
        assert!(out.signal().is_some(), "{p}: {}", out.describe());
        crashes += 1;
        assert_never_partial(&j, &plan, p);
    }
    assert!(crashes >= 7, "only {crashes} fault points crashed");
    // Each crashed run got one step further; this one finishes.
    let r = j.cmd("v1", &j.disk, &["--json"]).ok().json();
    assert_eq!(r["resumed_after"], "table", "{r}");
    check_disk(
        &j.disk,
        &j.disk,
        512,
        &r["plan"],
        &fixture_tree("v1"),
        &j.s.join("mnt"),
        "node-01",
    );
    // kill -9 at random times over a full run's length; each run has new
    // inputs (another host name), so it starts over on a provisioned disk.
    std::fs::write(&j.drive, DRIVE.replace("node-01", "node-full")).expect("drive");
    let t = Instant::now();
    j.cmd("v1", &j.disk, &[]).ok();
    let full = t.elapsed();
    let mut rng = Rng::new(12);
    for i in 0..6 {
        let host = format!("node-{i:02}");
        std::fs::write(&j.drive, DRIVE.replace("node-01", &host)).expect("drive");
        let bg = Bg::spawn(j.cmd("v1", &j.disk, &[]));
        let at = full.mul_f64(0.05 + 0.9 * rng.unit());
        std::thread::sleep(at);
        let pid = bg.child.id().to_string();
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .expect("kill");
        let (st, _, err) = bg.wait();
        eprintln!("kill {i} at {at:.1?}: {st:?}");
        assert_never_partial(&j, &plan, &format!("kill {i} at {at:.1?}: {err}"));
        let out = j.cmd("v1", &j.disk, &["--json"]).ok();
        let r = out.json();
        assert!(
            r["result"] == "provisioned" || r["result"] == "nothing-to-do",
            "{}",
            out.describe()
        );
        check_disk(
            &j.disk,
            &j.disk,
            512,
            &r["plan"],
            &fixture_tree("v1"),
            &j.s.join("mnt"),
            &host,
        );
    }
}

#[test]
fn bad_inputs_refused_with_the_disk_byte_identical() {
    let j = Job::new("prov-bad", 1 << 30);
    // Something an old node had at both ends (wiping would show).
    cmd("sh", ["-c", &format!("yes old | head -c 1048576 | dd of={0} conv=notrunc status=none && yes old | head -c 1048576 | dd of={0} bs=1M seek=1023 conv=notrunc status=none", j.disk.display())]);
    let before = digest(&j.disk);
    let good_scheme = SCHEME.to_string();
    let cases: Vec<(&str, String, String, i32, &str)> = vec![
        (
            "too large",
            good_scheme.replace("min = \"400MiB\"", "min = \"2GiB\""),
            DRIVE.into(),
            EXIT_USAGE,
            "usable",
        ),
        (
            "overlap",
            good_scheme
                .replace("size = \"32MiB\"", "size = \"32MiB\"\nstart = \"2MiB\"")
                .replace("min = \"400MiB\"", "min = \"400MiB\"\nstart = \"8MiB\""),
            DRIVE.into(),
            EXIT_USAGE,
            "inside the partitions before it",
        ),
        (
            "unknown role",
            good_scheme.replace("role = \"data\"", "role = \"home\""),
            DRIVE.into(),
            EXIT_USAGE,
            "unknown variant `home`",
        ),
        (
            "two roots",
            good_scheme.replace("role = \"data\"\nmount = \"/srv\"", "role = \"root\""),
            DRIVE.into(),
            EXIT_USAGE,
            "more than one root",
        ),
        (
            "no uuid",
            good_scheme.clone(),
            DRIVE.replace("uuid = \"4bd5c5a1-0f4e-4a4b-9d6c-3f0b9c1e0a11\"\n", ""),
            EXIT_USAGE,
            "needs a uuid",
        ),
    ];
    for (what, scheme, drive, code, msg) in cases {
        std::fs::write(&j.scheme, scheme).expect("scheme");
        std::fs::write(&j.drive, drive).expect("drive");
        let out = j.cmd("v1", &j.disk, &[]).code(code);
        assert!(out.stderr.contains(msg), "{what}: {}", out.describe());
        assert_eq!(digest(&j.disk), before, "{what}: the disk changed");
    }
    std::fs::write(&j.scheme, SCHEME).expect("scheme");
    std::fs::write(&j.drive, DRIVE).expect("drive");
    // A missing disk.
    let out = j.cmd("v1", &j.s.join("no-such-disk"), &[]).code(EXIT_USAGE);
    assert!(out.stderr.contains("does not exist"), "{}", out.describe());
    // An image signed by a key the node does not trust.
    let other = keygen(&j.s.join("other"), "other");
    std::fs::remove_file(j.keys.join("publisher.pub")).expect("rm key");
    std::fs::copy(&other.public, j.keys.join("other.pub")).expect("other key");
    let out = j.cmd("v1", &j.disk, &[]).code(EXIT_UNTRUSTED);
    assert!(
        out.stderr.contains("signature") || out.stderr.contains("trusted"),
        "{}",
        out.describe()
    );
    assert_eq!(digest(&j.disk), before, "untrusted: the disk changed");
    // Positive control: the trusted key, same disk: provisioned, changed.
    std::fs::copy(&shared_store().key.public, j.keys.join("publisher.pub")).expect("key");
    std::fs::remove_file(j.keys.join("other.pub")).expect("rm other");
    j.cmd("v1", &j.disk, &[]).ok();
    assert_ne!(
        digest(&j.disk),
        before,
        "the good inputs did not change the disk"
    );
    assert!(sfdisk_json(&j.disk).is_some());
}
