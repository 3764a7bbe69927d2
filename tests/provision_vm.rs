//! The provisioning boot test (issue 12): a bookworm image with the cloud
//! kernel, systemd and cloud-init (tests/fixtures/build-prov-tree.sh),
//! published signed and served by `imageupd serve` on loopback, is
//! provisioned onto a 4096-byte-sector disk (a loop device with
//! `--sector-size 4096`: GPT, ESP with a standalone GRUB, ext4 root, a
//! vfat config-2 drive at the end) by `imageupd provision`, then booted
//! under qemu TCG with OVMF (the guest's disk has 4096-byte logical
//! sectors too), user networking restricted, serial to a file.
//!
//! What the guest proves on its serial console: cloud-init reported
//! DataSourceConfigDrive with the config-2 partition as source; the runcmd
//! marker shows the instance-id equal to the uuid, the hostname, the
//! static address of network_data.json and the output of the user_data's
//! shell-script part (so the multipart MIME was consumed); a unit after
//! cloud-final shows the image id, that `/` is the provisioned root
//! filesystem (by UUID, and `root=UUID=` on the kernel command line) and
//! that the configdrive's SSH key is in the default user's
//! authorized_keys. `result.json` has no errors.
//!
//! Then the disk's root is updated in place offline (`apply --root` on the
//! loop-mounted partition, as the agent would from the same store) to the
//! next image and booted again: it runs the new image, and cloud-init's
//! state survived the update (the provisioned preserve fragment), so the
//! instance is not new: runcmd did not run again, the hostname, address,
//! user and key are still there.
//!
//! One test, two boots (the 512-byte-sector disk is provisioned and checked
//! offline by tests/provision.rs; booting it too would cost two more).

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::serve::Server;
use common::*;

/// The instance UUID of the configdrive.
const UUID: &str = "7c0f3a52-5d1e-4f6b-a0c2-9e8d7b6a5f41";
/// The SSH public key of the configdrive (its comment is looked for).
const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl prov-test-key";
/// Longest a boot to power-off may take under TCG.
const BOOT_LIMIT: Duration = Duration::from_secs(600);
/// Logical sector size of the disk, bytes.
const SECTOR: u64 = 4096;
/// The boot scheme: UEFI, ESP, root, configdrive.
const SCHEME: &str = r#"
firmware = "uefi"
cmdline = "ro console=ttyS0 systemd.show_status=false"
[[disk]]
name = "vda"
boot = true
[[disk.partition]]
role = "esp"
size = "64MiB"
[[disk.partition]]
role = "root"
min = "1GiB"
[[disk.partition]]
role = "configdrive"
size = "64MiB"
"#;

/// Configdrive inputs: static address on the NIC's MAC, an SSH key; the
/// shell-script part leaves a file the runcmd marker prints; runcmd
/// prints the marker to the serial console and counts its runs.
fn drive() -> String {
    format!(
        r##"
uuid = "{UUID}"
hostname = "node-01"
public_keys = {{ default = "{SSH_KEY}" }}
[[link]]
id = "eth0"
mac = "52:54:00:12:34:56"
[[network]]
link = "eth0"
address = "10.0.2.15/24"
gateway = "10.0.2.2"
dns = ["10.0.2.3"]
[[user_data]]
type = "text/x-shellscript"
content = "#!/bin/sh\necho part2-ran > /run/prov-part\n"
[[user_data]]
type = "text/cloud-config"
content = """#cloud-config
locale: false
runcmd:
  - [sh, -c, 'echo run >> /var/log/prov-runcmd; echo "MARK iid=$(cat /var/lib/cloud/data/instance-id) host=$(hostname) addr=$(hostname -I | tr -d " ") part=$(cat /run/prov-part)" > /dev/ttyS0']
"""
"##
    )
}

/// Run after cloud-final by the image's own unit: what the guest runs.
const MARK_SCRIPT: &str = r#"#!/bin/sh
keys=/home/debian/.ssh/authorized_keys
echo "BOOTED image=$(cat /etc/image_id) root=$(findmnt -no UUID /) cmdline_root=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^root=//p') host=$(hostname) addr=$(hostname -I | tr -d ' ') user=$(id -un debian) key=$(grep -c prov-test-key $keys) runs=$(wc -l < /var/log/prov-runcmd)" > /dev/ttyS0
systemctl --no-block poweroff
"#;

/// The test's own image layer over the cinit tree: a unit that, after
/// cloud-init's last stage, prints what the guest sees and powers off.
fn image_tree(dir: &Path, id: &str) -> PathBuf {
    let t = dir.join(id);
    let src = cache_dir().join("vm/cinit");
    assert!(
        src.join("usr/bin/cloud-init").is_file(),
        "no cloud-init tree: tests/setup.sh fixtures builds it (tests/fixtures/build-prov-tree.sh)"
    );
    cmd("cp", [OsStr::new("-a"), src.as_os_str(), t.as_os_str()]);
    let script = t.join("usr/local/sbin/prov-mark");
    std::fs::create_dir_all(script.parent().expect("dir")).expect("sbin");
    std::fs::write(&script, MARK_SCRIPT).expect("script");
    cmd("chmod", [OsStr::new("755"), script.as_os_str()]);
    let unit = "[Unit]\nAfter=cloud-final.service multi-user.target\n[Service]\nType=oneshot\nExecStart=/usr/local/sbin/prov-mark\n[Install]\nWantedBy=multi-user.target\n";
    std::fs::write(t.join("etc/systemd/system/prov-mark.service"), unit).expect("unit");
    let wants = t.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).expect("wants");
    std::os::unix::fs::symlink(
        "/etc/systemd/system/prov-mark.service",
        wants.join("prov-mark.service"),
    )
    .expect("link");
    std::fs::write(t.join("etc/prov-image"), id).expect("stamp");
    t
}

/// The store with c1 and c2 (c2 = c1 + one file), signed.
struct Prep {
    _s: Scratch,
    store: PathBuf,
    keys: PathBuf,
    c2: PathBuf,
}

fn prep() -> Prep {
    let s = scratch("provvm-prep");
    let key = keygen(&s.join("keys"), "publisher");
    let keys = s.join("trusted.d");
    std::fs::create_dir_all(&keys).expect("keys");
    std::fs::copy(&key.public, keys.join("publisher.pub")).expect("key");
    let store = s.join("store");
    let c1 = image_tree(s.path(), "c1");
    let c2 = image_tree(s.path(), "c2");
    std::fs::write(c2.join("etc/c2-only"), "c2\n").expect("c2 file");
    let t = Instant::now();
    for (id, tree, parent) in [("c1", &c1, None), ("c2", &c2, Some("c1"))] {
        let mut r = imageupd(["publish", "--store"])
            .arg(&store)
            .args(["--id", id, "--level", "1", "--key"])
            .arg(&key.secret);
        if let Some(p) = parent {
            r = r.args(["--parent", p]);
        }
        r.arg(tree).ok();
    }
    eprintln!("published c1, c2 in {:.1?}", t.elapsed());
    Prep {
        _s: s,
        store,
        keys,
        c2,
    }
}

/// qemu TCG + OVMF on the disk until the guest powers off; the serial log.
fn boot(disk: &Path, log: &Path) -> String {
    let t = Instant::now();
    let mut c = Command::new("timeout");
    c.arg(BOOT_LIMIT.as_secs().to_string())
        .arg("qemu-system-x86_64")
        .args([
            "-accel", "tcg", "-machine", "q35", "-m", "1536", "-smp", "2",
        ])
        .args([
            "-bios",
            "/usr/share/ovmf/OVMF.fd",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,cache=unsafe",
            disk.display()
        ))
        .arg("-device")
        .arg(format!(
            "virtio-blk-pci,drive=d0,bootindex=0,logical_block_size={SECTOR},physical_block_size={SECTOR}"
        ))
        // No option ROM: the firmware has nothing to try before the disk.
        .args([
            "-netdev",
            "user,id=n0,restrict=on,ipv6=off",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56,romfile=",
        ])
        .stdin(Stdio::null());
    let st = c.status().expect("run qemu");
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    eprintln!("boot took {:.1?} ({st})", t.elapsed());
    // Kept past the scratch directory, for a failure's post-mortem.
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "provision-vm-{}",
        log.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("boot.log")
    ));
    if let Err(e) = std::fs::write(&keep, &text) {
        eprintln!("could not keep {}: {e}", keep.display());
    }
    assert!(
        st.success(),
        "qemu: {st} (timeout {BOOT_LIMIT:?})\n{}",
        tail(&text, 120)
    );
    text
}

/// The last `n` lines (a boot log's end is where it went wrong).
fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// The one line of the serial log starting with `prefix` (exactly one).
fn line<'a>(serial: &'a str, prefix: &str) -> &'a str {
    let found: Vec<&str> = serial
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .filter(|l| l.starts_with(prefix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want one {prefix:?} line, got {found:?}\n{}",
        tail(serial, 150)
    );
    found[0]
}

/// A loop device over a byte range, detached on drop; with a mount.
struct Part {
    dev: String,
    mnt: Option<PathBuf>,
}

impl Part {
    fn new(file: &Path, start: u64, size: u64) -> Part {
        let dev = cmd(
            "losetup",
            [
                "--find",
                "--show",
                "--offset",
                &start.to_string(),
                "--sizelimit",
                &size.to_string(),
                "--sector-size",
                &SECTOR.to_string(),
                &file.display().to_string(),
            ],
        )
        .trim()
        .to_string();
        Part { dev, mnt: None }
    }

    fn mount(&mut self, at: &Path) -> PathBuf {
        std::fs::create_dir_all(at).expect("mnt");
        cmd("mount", [OsStr::new(&self.dev), at.as_os_str()]);
        self.mnt = Some(at.to_path_buf());
        at.to_path_buf()
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if let Some(m) = &self.mnt {
            if !Command::new("umount")
                .arg(m)
                .status()
                .is_ok_and(|s| s.success())
            {
                eprintln!("could not unmount {}", m.display());
            }
        }
        if !Command::new("losetup")
            .args(["-d", &self.dev])
            .status()
            .is_ok_and(|s| s.success())
        {
            eprintln!("could not detach {}", self.dev);
        }
    }
}

/// A loop device with the disk's sector size over the whole file,
/// detached on drop.
struct Whole(String);

impl Drop for Whole {
    fn drop(&mut self) {
        if !Command::new("losetup")
            .args(["-d", &self.0])
            .status()
            .is_ok_and(|s| s.success())
        {
            eprintln!("could not detach {}", self.0);
        }
    }
}

fn span(plan: &serde_json::Value, role: &str) -> (u64, u64) {
    let p = plan["disks"][0]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["role"] == role)
        .unwrap_or_else(|| panic!("no {role}"));
    (
        p["start_bytes"].as_u64().expect("start"),
        p["size_bytes"].as_u64().expect("size"),
    )
}

fn fs_uuid(plan: &serde_json::Value, role: &str) -> String {
    plan["disks"][0]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .find(|p| p["role"] == role)
        .and_then(|p| p["fs_uuid"].as_str())
        .unwrap_or_else(|| panic!("no fs_uuid for {role}"))
        .to_string()
}

/// Provision c1 from `imageupd serve`, onto the 4096-byte-sector disk.
fn provision(p: &Prep, s: &Scratch, file: &Path) -> serde_json::Value {
    let scheme = s.join("scheme.toml");
    std::fs::write(&scheme, SCHEME).expect("scheme");
    let drive_f = s.join("drive.toml");
    std::fs::write(&drive_f, drive()).expect("drive");
    let server = Server::local(&p.store, &s.join("serve.log"));
    let lo = Whole(
        cmd(
            "losetup",
            [
                "--find",
                "--show",
                "--sector-size",
                &SECTOR.to_string(),
                &file.display().to_string(),
            ],
        )
        .trim()
        .to_string(),
    );
    let t = Instant::now();
    let out = imageupd([
        "provision",
        "--json",
        "--from",
        &server.url,
        "--id",
        "c1",
        "--scheme",
    ])
    .arg(&scheme)
    .args(["--disk", &lo.0, "--configdrive"])
    .arg(&drive_f)
    .arg("--trusted-keys")
    .arg(&p.keys)
    .timeout(Duration::from_secs(600))
    .run();
    drop(lo);
    let out = out.expect_ok();
    eprintln!("provisioned in {:.1?}", t.elapsed());
    let r = out.json();
    assert_eq!(r["result"], "provisioned");
    assert_eq!(r["plan"]["disks"][0]["sector_size"], SECTOR);
    r
}

/// Checks after the first boot, offline, on the root; then the update in
/// place to c2 (offline, from the same store).
fn check_then_update(p: &Prep, s: &Scratch, file: &Path, plan: &serde_json::Value) {
    let (rs, rz) = span(plan, "root");
    let mut root = Part::new(file, rs, rz);
    let m = root.mount(&s.join("root"));
    let result: serde_json::Value = serde_json::from_slice(
        &std::fs::read(m.join("var/lib/cloud/data/result.json")).expect("result.json"),
    )
    .expect("json");
    assert_eq!(result["v1"]["errors"], serde_json::json!([]), "{result}");
    assert!(
        result["v1"]["datasource"]
            .as_str()
            .unwrap_or("")
            .contains("ConfigDrive"),
        "{result}"
    );
    let eni =
        std::fs::read_to_string(m.join("etc/network/interfaces.d/50-cloud-init")).expect("eni");
    assert!(eni.contains("10.0.2.15"), "{eni}");
    let t = Instant::now();
    apply(&p.store, "c2", &m, &[]).expect_ok();
    eprintln!("updated in place to c2 in {:.1?}", t.elapsed());
    assert_eq!(image_id(&m).as_deref(), Some("c2"));
    assert_converged_except(
        &p.c2,
        &m,
        CLOUD_INIT_KEPT,
        "the provisioned, booted root updated offline to c2",
    );
    for kept in [
        "var/lib/cloud/data/instance-id",
        "etc/network/interfaces.d/50-cloud-init",
    ] {
        assert!(m.join(kept).exists(), "the update removed {kept}");
    }
}

#[test]
fn provision_4k_disk_boot_configdrive_then_update_in_place_and_boot() {
    let t0 = Instant::now();
    let p = prep();
    let s = scratch("provvm-4k");
    let file = s.join("node.raw");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(3 << 30))
        .expect("disk");
    let r = provision(&p, &s, &file);
    let plan = &r["plan"];
    let (cs, cz) = span(plan, "configdrive");
    {
        let cd = Part::new(&file, cs, cz);
        let o = cmd("blkid", ["-p", "-o", "export", &cd.dev]);
        assert!(
            o.contains("LABEL=config-2") && o.contains("TYPE=vfat"),
            "{o}"
        );
    }
    let root_uuid = fs_uuid(plan, "root");

    let serial = boot(&file, &s.join("boot1.log"));
    assert!(
        serial.contains("Datasource DataSourceConfigDrive [net,ver=2][source=/dev/vda3]"),
        "cloud-init did not use the config-2 partition\n{}",
        tail(&serial, 150)
    );
    assert_eq!(
        line(&serial, "MARK "),
        format!("MARK iid={UUID} host=node-01 addr=10.0.2.15 part=part2-ran")
    );
    let booted = format!(
        "BOOTED image=c1 root={root_uuid} cmdline_root=UUID={root_uuid} host=node-01 addr=10.0.2.15 user=debian key=1 runs=1"
    );
    assert_eq!(line(&serial, "BOOTED "), booted);

    check_then_update(&p, &s, &file, plan);

    let serial2 = boot(&file, &s.join("boot2.log"));
    assert!(
        !serial2.lines().any(|l| l.starts_with("MARK ")),
        "runcmd ran again after the update in place: cloud-init saw a new instance\n{}",
        tail(&serial2, 150)
    );
    assert_eq!(
        line(&serial2, "BOOTED "),
        booted.replace("image=c1", "image=c2"),
        "the updated disk does not run c2 with the first boot's state"
    );
    eprintln!("whole test: {:.1?}", t0.elapsed());
}
