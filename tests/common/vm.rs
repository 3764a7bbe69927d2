//! The VM scaffolding of tests/vm.rs: the images (fixture trees with the
//! imageupd binary, its units and the guest harness laid over them through
//! overlayfs), their store and disks, and a qemu guest driven through its
//! serial ports (commands in, `@@VM …@@` markers out).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::*;

/// Who applies updates inside the guest.
pub const DRIVER: Driver = Driver::Agent;

/// The kernel of v1 and v2.
pub const K_OLD: &str = "6.1.0-47-cloud-amd64";
/// The kernel of v3.
pub const K_NEW: &str = "6.1.0-50-cloud-amd64";
/// Size of the root disk image (sparse), in MiB.
pub const ROOT_DISK_MIB: u64 = 2048;
/// Size of the data disk image (sparse), in MiB.
pub const DATA_DISK_MIB: u64 = 1024;
/// Longest wait for a boot (qemu start or kexec/reboot to the harness).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for an in-place update to show.
pub const APPLY_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for one harness command's answer.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(dead_code)] // one of the two is not selected
pub enum Driver {
    /// `imageupd agent` (systemd/imageupd-agent.service).
    Agent,
    /// tests/vm/guest's imageupd-vm-apply.{path,service}.
    Oneshot,
}

pub fn skip() -> bool {
    if std::env::var_os("IMAGEUPD_TEST_NO_VM").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: IMAGEUPD_TEST_NO_VM=1");
        return true;
    }
    false
}

// ---------------------------------------------------------------------------
// Images, disks and the store.

/// Everything the scenarios boot from, built once per test process.
pub struct Prep {
    pub _scratch: Scratch,
    pub dir: PathBuf,
    pub store: PathBuf,
    /// Root disk with node policy kexec.
    pub root_kexec: PathBuf,
    /// Root disk with node policy reboot.
    pub root_reboot: PathBuf,
    /// Data disk contents (store + metadata).
    pub data_dir: PathBuf,
    /// `imageupd plan --json` on the v1 node, for v2 and v3.
    pub plan_v2: serde_json::Value,
    pub plan_v3: serde_json::Value,
    /// Human plan on the v1 node for v3.
    pub plan_v3_text: String,
    /// Preparation time.
    pub took: Duration,
}

/// An overlay mount, unmounted on drop.
pub struct Overlay {
    pub merged: PathBuf,
}

impl Overlay {
    pub fn mount(lower: &[&Path], upper: &Path, work: &Path, merged: &Path) -> Overlay {
        for d in [upper, work, merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        cmd(
            "mount",
            [
                "-t".to_string(),
                "overlay".into(),
                "overlay".into(),
                "-o".into(),
                format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lowers.join(":"),
                    upper.display(),
                    work.display()
                ),
                merged.display().to_string(),
            ],
        );
        Overlay {
            merged: merged.to_path_buf(),
        }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.merged).status();
    }
}

pub fn vm_trees() -> PathBuf {
    Run::new(repo_root().join("tests/fixtures/build-vm-trees.sh"))
        .timeout(Duration::from_secs(1800))
        .ok();
    cache_dir().join("vm")
}

/// Copy a directory's mode, owner and mtime from the same path in `lower`,
/// for every directory of `upper` (so a layer changes no directory's
/// metadata but its own files').
pub fn match_dirs(upper: &Path, lower: &Path) {
    sh(&format!(
        "cd {u} && find . -mindepth 1 -type d -print0 | sort -rz | while IFS= read -r -d '' d; do \
           if [ -d {l}/\"$d\" ]; then chmod --reference={l}/\"$d\" \"$d\"; chown --reference={l}/\"$d\" \"$d\"; touch -h -r {l}/\"$d\" \"$d\"; fi; done",
        u = upper.display(),
        l = lower.display()
    ));
}

/// The layer that makes tree `lower` image `id`.
pub fn image_layer(dir: &Path, id: &str, lower: &Path) -> PathBuf {
    let up = dir.join(format!("layer-{id}"));
    std::fs::create_dir_all(up.join("usr/bin")).unwrap();
    std::fs::create_dir_all(up.join("usr/local/bin")).unwrap();
    // The binary under test, without debug info.
    cmd(
        "strip",
        [
            OsArg::from("--strip-debug"),
            OsArg::from("-o"),
            up.join("usr/bin/imageupd").into(),
            OsArg::from(bin()),
        ],
    );
    sh(&format!(
        "cp -a {}/. {}/",
        repo_root().join("tests/vm/guest").display(),
        up.display()
    ));
    let units = up.join("etc/systemd/system");
    for u in ["imageupd-agent.service", "imageupd-boot-check.service"] {
        std::fs::copy(repo_root().join("systemd").join(u), units.join(u)).unwrap();
    }
    let wants = units.join("multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    let mut enabled = vec!["imageupd-boot-check.service", "imageupd-vm-harness.service"];
    enabled.push(match DRIVER {
        Driver::Agent => "imageupd-agent.service",
        Driver::Oneshot => "imageupd-vm-apply.path",
    });
    for u in enabled {
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{u}"), wants.join(u)).unwrap();
    }
    let hello = up.join("usr/local/bin/vm-hello");
    std::fs::write(&hello, format!("#!/bin/sh\necho hello from {id}\n")).unwrap();
    sh(&format!("chmod 755 {}", hello.display()));
    match_dirs(&up, lower);
    up
}

/// A short alias for command arguments.
pub type OsArg = std::ffi::OsString;

pub fn mkfs(dir: &Path, img: &Path, mib: u64, label: &str) {
    let _ = std::fs::remove_file(img);
    cmd(
        "mkfs.ext4",
        [
            OsArg::from("-q"),
            OsArg::from("-F"),
            OsArg::from("-L"),
            OsArg::from(label),
            OsArg::from("-m"),
            OsArg::from("0"),
            OsArg::from("-d"),
            dir.into(),
            img.into(),
            OsArg::from(format!("{mib}M")),
        ],
    );
}

pub fn node_config(policy: &str) -> String {
    let mut s = format!("kernel_policy = \"{policy}\"\n");
    if DRIVER == Driver::Agent {
        s.push_str("\n[agent]\nmetadata_file = \"/mnt/data/metadata.json\"\ndefault_source = \"/mnt/data/store\"\ndebounce_ms = 200\n");
    }
    s
}

pub fn prep() -> &'static Prep {
    static P: OnceLock<Prep> = OnceLock::new();
    P.get_or_init(|| {
        let t0 = Instant::now();
        assert!(
            Command::new("qemu-system-x86_64").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success()),
            "qemu-system-x86_64 is required (apt-get install qemu-system-x86), or set IMAGEUPD_TEST_NO_VM=1 to skip"
        );
        let trees = vm_trees();
        let (k47, k50) = (trees.join("k47"), trees.join("k50"));
        let scratch = scratch("vm");
        let dir = scratch.path().to_path_buf();
        let key = keygen(&dir.join("keys"), "vm");
        let store = dir.join("data/store");
        let mut parent: Option<&str> = None;
        for (id, lower) in [("v1", &k47), ("v2", &k47), ("v3", &k50)] {
            let layer = image_layer(&dir, id, lower);
            let ov = Overlay::mount(&[&layer, lower], &dir.join(format!("upper-{id}")), &dir.join(format!("work-{id}")), &dir.join(format!("image-{id}")));
            publish(&store, id, Some(&key), parent, &ov.merged);
            parent = Some(id);
        }
        // The node: v1 plus node-local files, adopted by an apply of v1.
        let node_up = dir.join("node-upper");
        trust(&node_up, &key);
        std::fs::create_dir_all(node_up.join("etc/imageupd/config.d")).unwrap();
        std::fs::write(
            node_up.join("etc/fstab"),
            "/dev/vda  /          ext4  ro,errors=remount-ro  0 0\n/dev/vdb  /mnt/data  ext4  rw                    0 0\n",
        )
        .unwrap();
        // A pre-reboot hook that shows on the console when it runs.
        let hook = node_up.join("etc/imageupd/hooks/pre-reboot.d/10-vm-mark");
        std::fs::create_dir_all(hook.parent().unwrap()).unwrap();
        std::fs::write(
            &hook,
            "#!/bin/sh\nprintf '@@VM pre-reboot to=%s changed=%s@@\\n' \"$IMAGEUPD_TO\" \"$IMAGEUPD_KERNEL_CHANGED\" >/dev/ttyS0\n",
        )
        .unwrap();
        sh(&format!("chmod 755 {}", hook.display()));
        let node = Overlay::mount(&[&dir.join("layer-v1"), &k47], &node_up, &dir.join("node-work"), &dir.join("node"));
        apply(&store, "v1", &node.merged, &[]).expect_ok();
        assert_eq!(image_id(&node.merged).as_deref(), Some("v1"));
        // Adopting counts as a kernel change on a plain directory; the node
        // starts without one.
        let _ = std::fs::remove_file(node.merged.join("var/lib/imageupd/kernel.json"));
        let plan = |id: &str, json: bool| {
            let mut r = imageupd(["plan", "--from"]).arg(&store).args(["--id", id, "--root"]).arg(&node.merged);
            if json {
                r = r.arg("--json");
            }
            r.ok()
        };
        let plan_v2 = plan("v2", true).json();
        let plan_v3 = plan("v3", true).json();
        let plan_v3_text = plan("v3", false).stdout;
        let cfg = node.merged.join("etc/imageupd/config.d/50-vm.toml");
        let root_kexec = dir.join("root-kexec.img");
        let root_reboot = dir.join("root-reboot.img");
        std::fs::write(&cfg, node_config("kexec")).unwrap();
        mkfs(&node.merged, &root_kexec, ROOT_DISK_MIB, "root");
        std::fs::write(&cfg, node_config("reboot")).unwrap();
        mkfs(&node.merged, &root_reboot, ROOT_DISK_MIB, "root");
        drop(node);
        std::fs::write(dir.join("data/metadata.json"), "{\"image_id\": \"v1\"}\n").unwrap();
        let took = t0.elapsed();
        eprintln!("vm: images, store and disks ready in {took:.1?}");
        Prep { dir: dir.clone(), store, root_kexec, root_reboot, data_dir: dir.join("data"), plan_v2, plan_v3, plan_v3_text, took, _scratch: scratch }
    })
}

// ---------------------------------------------------------------------------
// The VM.

/// One `@@VM kind key=value ...@@` line.
#[derive(Debug, Clone)]
pub struct Marker {
    pub kind: String,
    pub kv: HashMap<String, String>,
}

impl Marker {
    /// Every complete marker in a line (a marker can follow the cut-off
    /// rest of one whose writer died in a kexec).
    pub fn parse_all(line: &str) -> Vec<Marker> {
        line.split("@@VM ")
            .skip(1)
            .filter_map(|seg| {
                let body = &seg[..seg.find("@@")?];
                let mut words = body.split_whitespace();
                let kind = words.next()?.to_string();
                let kv = words
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                Some(Marker { kind, kv })
            })
            .collect()
    }

    pub fn get(&self, k: &str) -> &str {
        self.kv
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("marker {self:?} has no {k}"))
    }

    pub fn b64(&self, k: &str) -> String {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.get(k))
            .unwrap_or_default();
        String::from_utf8_lossy(&raw).into_owned()
    }
}

/// A running qemu, killed on drop.
pub struct Vm {
    pub name: String,
    pub child: Child,
    pub console: PathBuf,
    pub sock: PathBuf,
    pub ctl: Option<UnixStream>,
    /// Bytes of the console log already consumed.
    pub cursor: usize,
}

impl Vm {
    pub fn boot(
        name: &str,
        dir: &Path,
        kernel: &Path,
        initrd: &Path,
        root: &Path,
        data: &Path,
    ) -> Vm {
        let console = dir.join(format!("{name}.console.log"));
        let sock = dir.join(format!("{name}.ctl.sock"));
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&sock);
        let mut append =
            "console=ttyS0 root=/dev/vda ro quiet loglevel=3 panic=-1 systemd.show_status=false"
                .to_string();
        if std::env::var_os("IMAGEUPD_VM_DEBUG").is_some() {
            append.push_str(" systemd.journald.forward_to_console=1");
        }
        let stderr = std::fs::File::create(dir.join(format!("{name}.qemu.err"))).unwrap();
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "1024",
                "-smp",
                "2",
                "-nodefaults",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(kernel)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", root.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=raw", data.display()))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting qemu-system-x86_64");
        eprintln!(
            "vm {name}: qemu started (pid {}), kernel {}",
            child.id(),
            kernel.display()
        );
        Vm {
            name: name.into(),
            child,
            console,
            sock,
            ctl: None,
            cursor: 0,
        }
    }

    pub fn console_tail(&self) -> String {
        let text =
            String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(80);
        format!(
            "--- last console lines of vm {} ({}) ---\n{}",
            self.name,
            self.console.display(),
            lines[from..].join("\n")
        )
    }

    /// Wait for a marker of `kind` that `pred` accepts, after the cursor.
    #[track_caller]
    pub fn wait(
        &mut self,
        kind: &str,
        timeout: Duration,
        pred: impl Fn(&Marker) -> bool,
    ) -> Marker {
        let start = Instant::now();
        loop {
            let bytes = std::fs::read(&self.console).unwrap_or_default();
            if bytes.len() > self.cursor {
                let text = &bytes[self.cursor..];
                // Only whole lines.
                if let Some(last_nl) = text.iter().rposition(|&b| b == b'\n') {
                    let chunk = String::from_utf8_lossy(&text[..=last_nl]).into_owned();
                    let mut consumed = 0;
                    for line in chunk.split_inclusive('\n') {
                        consumed += line.len();
                        for m in Marker::parse_all(line) {
                            if m.kind == "error" {
                                panic!(
                                    "vm {}: the harness failed: {line}\n{}",
                                    self.name,
                                    self.console_tail()
                                );
                            }
                            if m.kind == kind && pred(&m) {
                                self.cursor += consumed;
                                return m;
                            }
                        }
                    }
                    self.cursor += consumed;
                }
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "vm {}: qemu exited ({st}) while waiting for {kind}\n{}",
                    self.name,
                    self.console_tail()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "vm {}: no {kind} marker within {timeout:?}\n{}",
                    self.name,
                    self.console_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Send one command line to the harness.
    pub fn send(&mut self, line: &str) {
        if self.ctl.is_none() {
            let mut s = UnixStream::connect(&self.sock)
                .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.sock.display()));
            // An empty line first: it ends anything half-received.
            s.write_all(b"\n").unwrap();
            self.ctl = Some(s);
        }
        let s = self.ctl.as_mut().unwrap();
        s.write_all(format!("{line}\n").as_bytes())
            .expect("writing to the guest's serial port");
        s.flush().unwrap();
    }

    #[track_caller]
    pub fn probe(&mut self, tag: &str) -> Marker {
        self.send(&format!("probe {tag}"));
        self.wait("probe", COMMAND_TIMEOUT, |m| {
            m.kv.get("tag").map(String::as_str) == Some(tag)
        })
    }

    #[track_caller]
    pub fn verify(&mut self, tag: &str) -> Marker {
        self.send(&format!("verify {tag}"));
        self.wait("verify", COMMAND_TIMEOUT, |m| {
            m.kv.get("tag").map(String::as_str) == Some(tag)
        })
    }

    /// Write the metadata in the guest (what os-collect-config would do).
    pub fn metadata(&mut self, id: &str, policy: &str) {
        self.send(&format!(
            "meta {{\"image_id\": \"{id}\", \"kernel_policy\": \"{policy}\"}}"
        ));
        self.wait("meta-written", COMMAND_TIMEOUT, |_| true);
    }

    /// Wait for qemu to exit by itself.
    #[track_caller]
    pub fn wait_exit(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "vm {}: qemu did not exit within {timeout:?}\n{}",
                    self.name,
                    self.console_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn poweroff(mut self) {
        self.send("poweroff");
        self.wait_exit(Duration::from_secs(120));
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `imageupd status --json` a probe carried.
pub fn status_of(m: &Marker) -> serde_json::Value {
    let text = m.b64("status");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status in {m:?} is not JSON ({e}): {text}"))
}

pub fn data_disk(p: &Prep, name: &str) -> PathBuf {
    let img = p.dir.join(format!("{name}.data.img"));
    mkfs(&p.data_dir, &img, DATA_DISK_MIB, "data");
    img
}

pub fn copy_disk(src: &Path, name: &str, p: &Prep) -> PathBuf {
    let img = p.dir.join(format!("{name}.root.img"));
    cmd(
        "cp",
        [
            OsArg::from("--sparse=always"),
            src.into(),
            img.clone().into(),
        ],
    );
    img
}

/// Kernel and initrd of the v1 image, from the cached tree.
pub fn v1_kernel() -> (PathBuf, PathBuf) {
    let t = cache_dir().join("vm/k47/boot");
    (
        t.join(format!("vmlinuz-{K_OLD}")),
        t.join(format!("initrd.img-{K_OLD}")),
    )
}

/// Play the boot loader: the kernel and initrd the updated disk's
/// `/vmlinuz` and `/initrd.img` links point at, copied out; plus the disk's
/// image id, kernel record, and module directories.
pub fn boot_loader(
    disk: &Path,
    dir: &Path,
) -> (PathBuf, PathBuf, String, serde_json::Value, Vec<String>) {
    let mnt = dir.join("bootloader-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    cmd(
        "mount",
        [
            OsArg::from("-o"),
            OsArg::from("loop,ro,noload"),
            disk.into(),
            mnt.clone().into(),
        ],
    );
    let res = std::panic::catch_unwind(|| {
        let pick = |link: &str| {
            let target = std::fs::read_link(mnt.join(link))
                .unwrap_or_else(|e| panic!("{link} on the updated disk: {e}"));
            let src = mnt.join(target.strip_prefix("/").unwrap_or(&target));
            let dst = dir.join(format!("booted-{link}"));
            std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
            dst
        };
        let (k, i) = (pick("vmlinuz"), pick("initrd.img"));
        let id = std::fs::read_to_string(mnt.join("etc/image_id"))
            .unwrap()
            .trim()
            .to_string();
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(mnt.join("var/lib/imageupd/kernel.json")).unwrap(),
        )
        .unwrap();
        let mut modules: Vec<String> = std::fs::read_dir(mnt.join("usr/lib/modules"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        modules.sort();
        (k, i, id, rec, modules)
    });
    cmd("umount", [&mnt]);
    res.unwrap_or_else(|e| std::panic::resume_unwind(e))
}
