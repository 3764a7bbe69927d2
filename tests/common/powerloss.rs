//! The guest side of tests/powerloss.rs: the initramfs (busybox, dmsetup,
//! imageupd, the kernel modules, tests/powerloss/init), the disks (the
//! store, and per scenario a root image of the adopted v1 node plus an
//! empty log disk), and one TCG boot that runs every scenario's apply
//! under dm-log-writes.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::vm::{Marker, OsArg, K_OLD};
use super::*;

/// Size of each root image (sparse), in MiB (xfs wants at least 300).
pub const ROOT_MIB: u64 = 640;
/// Size of each log disk (sparse), in MiB: well over twice what one apply
/// v1 -> v2 writes.
pub const LOG_MIB: u64 = 1536;
/// Longest wait for the guest to run every scenario and power off.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(900);
/// The modules the guest loads (with their dependencies, resolved from the
/// cached kernel tree): virtio disks, device-mapper with log-writes, xfs.
pub const MODULES: &[&str] = &["virtio_blk", "virtio_pci", "dm_log_writes", "xfs"];

/// One recorded apply: a filesystem, its mount options, and whether the
/// pre-swap syncfs is skipped (the positive control).
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Name (also the disk files' stem).
    pub name: String,
    /// `ext4` or `xfs`.
    pub fs: &'static str,
    /// Extra mount options, each with a leading comma ("" for none).
    pub opts: &'static str,
    /// `IMAGEUPD_TEST_UNSAFE_SKIP` value in the guest, when a control.
    pub skip: Option<&'static str>,
    /// The image the root disk started as (never written).
    pub pristine: PathBuf,
    /// The root disk the guest wrote (through dm-log-writes).
    pub root: PathBuf,
    /// The log disk.
    pub log: PathBuf,
}

impl Scenario {
    /// Mount options for a loop mount of a copy of this scenario's disk.
    pub fn host_mount_opts(&self) -> String {
        let mut o = format!("loop{}", self.opts);
        if self.fs == "xfs" {
            // Every copy has the pristine image's UUID.
            o.push_str(",nouuid");
        }
        o
    }
}

/// The kernel of the cached VM tree k47 and its module directory.
pub fn kernel() -> (PathBuf, PathBuf) {
    let trees = vm::vm_trees();
    let k = trees.join("k47");
    (
        k.join(format!("boot/vmlinuz-{K_OLD}")),
        k.join(format!("usr/lib/modules/{K_OLD}")),
    )
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// The `.ko` files of `want` and their dependencies, in load order (paths
/// relative to `moddir`); built-in modules are left out.
pub fn module_order(moddir: &Path, want: &[&str]) -> Vec<PathBuf> {
    let mut by_name: HashMap<String, PathBuf> = HashMap::new();
    for line in cmd(
        "find",
        [moddir.as_os_str(), "-name".as_ref(), "*.ko".as_ref()],
    )
    .lines()
    {
        let p = PathBuf::from(line);
        let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
        by_name.insert(norm(&stem), p);
    }
    let builtin = std::fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
    let builtin: Vec<String> = builtin
        .lines()
        .filter_map(|l| Path::new(l).file_stem())
        .map(|s| norm(&s.to_string_lossy()))
        .collect();
    let mut order = Vec::new();
    let mut seen = std::collections::HashSet::new();
    fn visit(
        name: &str,
        by_name: &HashMap<String, PathBuf>,
        builtin: &[String],
        seen: &mut std::collections::HashSet<String>,
        order: &mut Vec<PathBuf>,
    ) {
        let n = norm(name);
        if !seen.insert(n.clone()) {
            return;
        }
        let Some(p) = by_name.get(&n) else {
            assert!(
                builtin.contains(&n),
                "kernel module {n} is neither a .ko file nor built in"
            );
            return;
        };
        let deps = cmd("modinfo", [OsArg::from("-F"), "depends".into(), p.into()]);
        for d in deps.trim().split(',').filter(|d| !d.is_empty()) {
            visit(d, by_name, builtin, seen, order);
        }
        order.push(p.clone());
    }
    for w in want {
        visit(w, &by_name, &builtin, &mut seen, &mut order);
    }
    order
}

/// Copy a dynamically linked program and every library `ldd` names into
/// the initramfs tree `dst` (same paths).
fn copy_with_libs(dst: &Path, prog: &Path, as_path: &str) {
    let to = dst.join(as_path.trim_start_matches('/'));
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(prog, &to).unwrap_or_else(|e| panic!("copying {}: {e}", prog.display()));
    for line in cmd("ldd", [prog]).lines() {
        // "libx.so => /lib/.../libx.so (0x…)" or "/lib64/ld-linux… (0x…)".
        let lib = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|w| w.starts_with('/')),
        };
        let Some(lib) = lib.filter(|l| l.starts_with('/')) else {
            continue;
        };
        let t = dst.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(t.parent().unwrap()).unwrap();
        // Follows the library's symlink chain: the file itself is copied.
        std::fs::copy(lib, &t).unwrap_or_else(|e| panic!("copying {lib}: {e}"));
    }
}

/// Build the initramfs (gzip'd newc cpio) for `scenarios`, whose disks are
/// vdb, vdc, … in pairs (root, log) after the store on vda.
pub fn initramfs(dir: &Path, moddir: &Path, scenarios: &[Scenario]) -> PathBuf {
    let tree = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&tree);
    for d in ["bin", "sbin", "usr/bin", "lib/modules", "etc"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is required (apt-get install busybox-static; tests/setup.sh)"
    );
    std::fs::copy(busybox, tree.join("bin/busybox")).unwrap();
    let dmsetup = which("dmsetup");
    copy_with_libs(&tree, &dmsetup, "/sbin/dmsetup");
    let stripped = dir.join("imageupd.stripped");
    cmd(
        "strip",
        [
            OsArg::from("--strip-debug"),
            "-o".into(),
            stripped.clone().into(),
            bin().into(),
        ],
    );
    copy_with_libs(&tree, &stripped, "/usr/bin/imageupd");
    let guest = repo_root().join("tests/powerloss");
    for (f, to) in [("init", "init"), ("lwmark", "bin/lwmark")] {
        std::fs::copy(guest.join(f), tree.join(to)).unwrap();
    }
    let mut order = String::new();
    for ko in module_order(moddir, MODULES) {
        let name = ko.file_name().unwrap();
        std::fs::copy(&ko, tree.join("lib/modules").join(name)).unwrap();
        order.push_str(&format!("{}\n", name.to_string_lossy()));
    }
    std::fs::write(tree.join("etc/modules.order"), order).unwrap();
    let mut lines = String::new();
    for (i, s) in scenarios.iter().enumerate() {
        let opts = if s.opts.is_empty() { "-" } else { s.opts };
        lines.push_str(&format!(
            "{} {} {} {} {} {}\n",
            s.name,
            s.fs,
            opts,
            disk_name(1 + 2 * i),
            disk_name(2 + 2 * i),
            s.skip.unwrap_or("-")
        ));
    }
    std::fs::write(tree.join("etc/scenarios"), lines).unwrap();
    let out = dir.join("initramfs.cpio.gz");
    sh(&format!(
        "cd {} && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
        tree.display(),
        out.display()
    ));
    out
}

/// `vda`, `vdb`, … for disk index `i` (0-based).
pub fn disk_name(i: usize) -> String {
    assert!(i < 26, "too many disks");
    format!("vd{}", (b'a' + i as u8) as char)
}

fn which(prog: &str) -> PathBuf {
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(d).join(prog);
        if p.exists() {
            return p;
        }
    }
    panic!("{prog} is required (see tests/setup.sh PACKAGES)")
}

/// A sparse file of `mib` MiB.
pub fn sparse(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

/// The pristine root image of filesystem `fs` holding `tree`.
pub fn root_image(dir: &Path, fs: &str, tree: &Path) -> PathBuf {
    let img = dir.join(format!("pristine-{fs}.img"));
    sparse(&img, ROOT_MIB);
    match fs {
        // Inode tables and journal zeroed now, so no lazy-init thread writes
        // into the log.
        "ext4" => {
            cmd(
                "mkfs.ext4",
                [
                    OsArg::from("-q"),
                    "-F".into(),
                    "-m".into(),
                    "0".into(),
                    "-E".into(),
                    "lazy_itable_init=0,lazy_journal_init=0".into(),
                    "-d".into(),
                    tree.into(),
                    img.clone().into(),
                ],
            );
        }
        "xfs" => {
            cmd(
                "mkfs.xfs",
                [OsArg::from("-q"), "-f".into(), img.clone().into()],
            );
            let mnt = dir.join("mkfs-mnt");
            std::fs::create_dir_all(&mnt).unwrap();
            cmd(
                "mount",
                [
                    OsArg::from("-o"),
                    "loop".into(),
                    img.clone().into(),
                    mnt.clone().into(),
                ],
            );
            let copied = Run::new("rsync")
                .args(["-aHAX", "--numeric-ids"])
                .arg(format!("{}/", tree.display()))
                .arg(format!("{}/", mnt.display()))
                .run();
            cmd("umount", [&mnt]);
            copied.expect_ok();
        }
        other => panic!("no root image recipe for {other}"),
    }
    img
}

/// The store disk: an ext4 image of `store`.
pub fn store_image(dir: &Path, store: &Path) -> PathBuf {
    let img = dir.join("store.img");
    let bytes: u64 = cmd("du", [OsArg::from("-sb"), store.into()])
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("du -sb of the store");
    sparse(&img, (bytes >> 20) * 2 + 64);
    cmd(
        "mkfs.ext4",
        [
            OsArg::from("-q"),
            "-F".into(),
            "-m".into(),
            "0".into(),
            "-E".into(),
            "lazy_itable_init=0,lazy_journal_init=0".into(),
            "-d".into(),
            store.into(),
            img.clone().into(),
        ],
    );
    img
}

/// What the guest reported per scenario: the apply's exit code.
pub type GuestResult = BTreeMap<String, i32>;

/// QEMU itself died by a signal (seen once here: a SIGSEGV in qemu 7.2's TCG
/// within seconds of start, console empty); not a result of the guest.
#[derive(Debug)]
pub struct QemuCrashed(pub String);

/// [`run_guest`], and once more on fresh disks ([`reset_disks`]) if QEMU
/// itself crashed; a second crash fails the test.
pub fn run_guest_retrying(
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    store: &Path,
    scenarios: &[Scenario],
) -> (GuestResult, Duration) {
    match run_guest(dir, kernel, initrd, store, scenarios) {
        Ok(r) => r,
        Err(QemuCrashed(why)) => {
            eprintln!("powerloss: {why}; booting once more on fresh disks");
            reset_disks(scenarios);
            run_guest(dir, kernel, initrd, store, scenarios).unwrap_or_else(|QemuCrashed(again)| {
                panic!("QEMU crashed twice: {why}; then {again}")
            })
        }
    }
}

/// Every scenario's root back to its pristine image and an empty log disk.
pub fn reset_disks(scenarios: &[Scenario]) {
    for sc in scenarios {
        let out = Command::new("cp")
            .arg("--sparse=always")
            .arg(&sc.pristine)
            .arg(&sc.root)
            .output()
            .expect("run cp");
        assert!(
            out.status.success(),
            "cp {}: {}",
            sc.root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        sparse(&sc.log, LOG_MIB);
    }
}

/// Boot the guest once (TCG) with the store and every scenario's disks,
/// wait for it to power off, and return each scenario's apply exit code;
/// `Err` only when QEMU itself was killed by a signal.
pub fn run_guest(
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    store: &Path,
    scenarios: &[Scenario],
) -> Result<(GuestResult, Duration), QemuCrashed> {
    let console = dir.join("guest.console.log");
    let t0 = Instant::now();
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
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
    .args([
        "-append",
        "console=ttyS0 quiet loglevel=3 panic=-1 rdinit=/init",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()));
    let mut disks = vec![store.to_path_buf()];
    for s in scenarios {
        disks.push(s.root.clone());
        disks.push(s.log.clone());
    }
    for d in &disks {
        // cache=unsafe: the host's page cache is all the guest's disks need
        // (the guest's power cut is simulated by the replay, not by qemu).
        c.arg("-drive").arg(format!(
            "file={},if=virtio,format=raw,cache=unsafe",
            d.display()
        ));
    }
    let stderr = std::fs::File::create(dir.join("guest.qemu.err")).unwrap();
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("starting qemu-system-x86_64");
    let tail = || {
        let t = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
        let l: Vec<&str> = t.lines().collect();
        format!(
            "--- last guest console lines ({}) ---\n{}",
            console.display(),
            l[l.len().saturating_sub(60)..].join("\n")
        )
    };
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            if let Some(sig) = st.signal() {
                let err = std::fs::read_to_string(dir.join("guest.qemu.err")).unwrap_or_default();
                return Err(QemuCrashed(format!(
                    "qemu was killed by signal {sig} after {:.1?} (stderr: {})\n{}",
                    t0.elapsed(),
                    err.trim(),
                    tail()
                )));
            }
            assert!(st.success(), "qemu exited with {st}\n{}", tail());
            break;
        }
        if t0.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the guest did not power off within {GUEST_TIMEOUT:?}\n{}",
                tail()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).into_owned();
    let mut res = GuestResult::new();
    let mut done = false;
    for m in text.lines().flat_map(Marker::parse_all) {
        match m.kind.as_str() {
            "error" => panic!("the guest failed: {}\n{}", m.b64("msg"), tail()),
            "applied" => {
                res.insert(m.get("name").to_string(), m.get("rc").parse().unwrap_or(-1));
            }
            "done" => done = true,
            _ => {}
        }
    }
    assert!(done, "the guest powered off before it was done\n{}", tail());
    Ok((res, took))
}
