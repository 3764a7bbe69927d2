//! The provisioning boot test (issue 12): a bookworm image with the cloud
//! kernel, systemd and cloud-init (tests/fixtures/build-prov-tree.sh),
//! published signed and served by `imageupd serve` on loopback, is
//! provisioned onto a disk image file by `imageupd provision` (GPT, ESP
//! with a standalone GRUB, ext4 root, config-2 drive at the end), then
//! booted under qemu TCG with OVMF, user networking restricted, serial to
//! a file. cloud-init must report DataSourceConfigDrive with the config-2
//! partition as source, the runcmd marker must show the instance-id equal
//! to the uuid, the hostname and the static address of network_data.json,
//! and result.json must have no errors. Then the disk's root is updated
//! offline (`apply --root` on the loop-mounted partition) to the next
//! image and booted again: it runs the new image. The same on a
//! 4096-byte-sector disk, whose configdrive is vfat.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::serve::Server;
use common::*;

/// The instance UUID of the configdrive.
const UUID: &str = "7c0f3a52-5d1e-4f6b-a0c2-9e8d7b6a5f41";
/// Longest a boot to power-off may take under TCG.
const BOOT_LIMIT: Duration = Duration::from_secs(900);

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

/// Configdrive inputs: static address on the NIC's MAC; runcmd prints the
/// marker to the serial console.
fn drive() -> String {
    format!(
        r##"
uuid = "{UUID}"
hostname = "node-01"
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
content = """#cloud-config
locale: false
runcmd:
  - [sh, -c, 'echo "MARK iid=$(cat /var/lib/cloud/data/instance-id) host=$(hostname) addr=$(hostname -I | tr -d " ")" > /dev/ttyS0']
"""
"##
    )
}

/// The test's own image layer over the cinit tree: a unit that, after
/// cloud-init's last stage, prints the running image id and powers off.
fn image_tree(dir: &Path, id: &str) -> PathBuf {
    let t = dir.join(id);
    let src = cache_dir().join("vm/cinit");
    assert!(
        src.join("usr/bin/cloud-init").is_file(),
        "run tests/fixtures/build-prov-tree.sh"
    );
    cmd("cp", [OsStr::new("-a"), src.as_os_str(), t.as_os_str()]);
    let unit = "[Unit]\nAfter=cloud-final.service multi-user.target\n[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo \"BOOTED image=$(cat /etc/image_id)\" > /dev/ttyS0; systemctl --no-block poweroff'\n[Install]\nWantedBy=multi-user.target\n";
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

fn prep() -> &'static Prep {
    static P: OnceLock<Prep> = OnceLock::new();
    P.get_or_init(|| {
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
                .args(["--id", id, "--level", "3", "--key"])
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
    })
}

/// qemu TCG + OVMF on the disk until the guest powers off; the serial log.
fn boot(disk: &Path, sector: u64, log: &Path) -> String {
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
        .arg(format!("file={},format=raw,if=none,id=d0", disk.display()))
        .arg("-device")
        .arg(format!(
            "virtio-blk-pci,drive=d0,logical_block_size={sector},physical_block_size={sector}"
        ))
        .args([
            "-nic",
            "user,restrict=on,model=virtio-net-pci,mac=52:54:00:12:34:56",
        ])
        .stdin(Stdio::null());
    let st = c.status().expect("run qemu");
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    eprintln!("boot took {:.1?} ({st})", t.elapsed());
    assert!(
        st.success(),
        "qemu: {st} (timeout {BOOT_LIMIT:?})\n{}",
        clip(&text, 120)
    );
    text
}

/// A loop device over a byte range, detached on drop; with a mount.
struct Part {
    dev: String,
    mnt: Option<PathBuf>,
}

impl Part {
    fn new(file: &Path, start: u64, size: u64, sector: u64) -> Part {
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
                &sector.to_string(),
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

/// Provision, boot, check cloud-init; update offline to c2, boot, check.
fn scenario(name: &str, sector: u64) {
    let p = prep();
    let s = scratch(name);
    let file = s.join("node.raw");
    std::fs::File::create(&file)
        .and_then(|f| f.set_len(3 << 30))
        .expect("disk");
    let scheme = s.join("scheme.toml");
    std::fs::write(&scheme, SCHEME).expect("scheme");
    let drive_f = s.join("drive.toml");
    std::fs::write(&drive_f, drive()).expect("drive");
    let server = Server::local(&p.store, &s.join("serve.log"));
    // A 4096-byte-sector disk is a loop device with that sector size.
    let lo = (sector != 512).then(|| {
        cmd(
            "losetup",
            [
                "--find",
                "--show",
                "--sector-size",
                &sector.to_string(),
                &file.display().to_string(),
            ],
        )
        .trim()
        .to_string()
    });
    let disk = lo.clone().unwrap_or_else(|| file.display().to_string());
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
    .args(["--disk", &disk, "--configdrive"])
    .arg(&drive_f)
    .arg("--trusted-keys")
    .arg(&p.keys)
    .timeout(Duration::from_secs(900))
    .run();
    if let Some(l) = &lo {
        cmd("losetup", ["-d", l]);
    }
    let out = out.expect_ok();
    eprintln!("{name}: provisioned in {:.1?}", t.elapsed());
    let r = out.json();
    assert_eq!(r["plan"]["disks"][0]["sector_size"], sector);
    let (cs, cz) = span(&r["plan"], "configdrive");
    {
        let cd = Part::new(&file, cs, cz, sector);
        let o = cmd("blkid", ["-p", "-o", "export", &cd.dev]);
        assert!(
            o.contains("LABEL=config-2") && o.contains("TYPE=vfat"),
            "{o}"
        );
    }
    let serial = boot(&file, sector, &s.join("boot1.log"));
    assert!(
        serial.contains("Datasource DataSourceConfigDrive [net,ver=2][source=/dev/vda3]"),
        "cloud-init did not use the config-2 partition\n{}",
        clip(&serial, 150)
    );
    let mark = format!("MARK iid={UUID} host=node-01 addr=10.0.2.15");
    assert!(
        serial.contains(&mark),
        "no {mark:?}\n{}",
        clip(&serial, 150)
    );
    assert!(serial.contains("BOOTED image=c1"), "{}", clip(&serial, 150));
    let (rs, rz) = span(&r["plan"], "root");
    {
        let mut root = Part::new(&file, rs, rz, sector);
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
        // The next day, offline: update the root in place to c2.
        apply(&p.store, "c2", &m, &[]).expect_ok();
        assert_eq!(image_id(&m).as_deref(), Some("c2"));
        assert_converged(&p.c2, &m, "the provisioned root updated offline to c2");
    }
    let serial2 = boot(&file, sector, &s.join("boot2.log"));
    assert!(
        serial2.contains("BOOTED image=c2"),
        "the updated disk does not run c2\n{}",
        clip(&serial2, 150)
    );
    drop(server);
}

#[test]
#[ignore = "issue 12, unfinished: the first run (2026-12-02) booted OVMF -> GRUB -> the image kernel with root=UUID, then failed an assertion not yet diagnosed; run with --ignored"]
fn provision_boot_configdrive_then_update_in_place() {
    scenario("provvm-512", 512);
}

#[test]
#[ignore = "issue 12, unfinished: the first run (2026-12-02) booted OVMF -> GRUB -> the image kernel with root=UUID, then failed an assertion not yet diagnosed; run with --ignored"]
fn provision_boot_4096_byte_sectors() {
    scenario("provvm-4k", 4096);
}
