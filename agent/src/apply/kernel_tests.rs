//! Kernel changes on scratch roots: two tiny images with different kernels
//! are published and applied with the real pipeline; acting uses a fake
//! kexec loader and fake systemd/logind on a private bus.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::*;
use crate::apply;
use crate::boot::confirm::*;
use crate::boot::dbus::testbus::{serve, Fakes, PrivateBus};
use crate::boot::dbus::Bus;
use crate::boot::kexec::*;
use crate::boot::reboot::*;
use crate::boot::record::*;
use crate::publish::image::{self as publish, PublishOptions};

const KA: &str = "1.0-a";
pub(crate) const KB: &str = "2.0-b";

/// One load the fake saw: kernel path, initrd path, command line, and the
/// bytes behind the kernel descriptor.
type Seen = (String, String, String, Vec<u8>);

/// A kexec loader that records what it is given; fails when `fail` is set.
#[derive(Default)]
pub(crate) struct FakeLoader {
    seen: Arc<Mutex<Vec<Seen>>>,
    unloads: Arc<Mutex<u32>>,
    fail: bool,
    /// A file that must exist when the kernel is loaded (the pre-reboot
    /// hook's mark).
    must_exist: Option<PathBuf>,
}

impl KexecLoader for FakeLoader {
    fn load(&self, img: &KexecImage) -> Result<()> {
        if let Some(p) = &self.must_exist {
            assert!(
                p.exists(),
                "the pre-reboot hooks must run before the kernel is loaded"
            );
        }
        let mut bytes = Vec::new();
        (&img.kernel).read_to_end(&mut bytes).unwrap();
        self.seen.lock().unwrap().push((
            img.kernel_path.to_string(),
            img.initrd_path
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            img.cmdline.to_str().unwrap().to_string(),
            bytes,
        ));
        if self.fail {
            bail!("fake loader: Exec format error");
        }
        Ok(())
    }
    fn unload(&self) {
        *self.unloads.lock().unwrap() += 1;
    }
}

/// A node with images `a` (kernel 1.0-a) and `b` (kernel 2.0-b) in a store,
/// its root at `a`.
pub(crate) struct Node {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) root: PathBuf,
    pub(crate) store: PathBuf,
}

fn write(p: &Path, content: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn tree(dir: &Path, k: &str, extra: &str) {
    write(
        &dir.join(format!("boot/vmlinuz-{k}")),
        &format!("kernel {k}"),
    );
    write(
        &dir.join(format!("boot/initrd.img-{k}")),
        &format!("initrd {k}"),
    );
    write(
        &dir.join(format!("usr/lib/modules/{k}/kernel/fs.ko")),
        &format!("module {k}"),
    );
    write(&dir.join("etc/os-release"), extra);
    std::fs::create_dir_all(dir.join("var/lib")).unwrap();
}

impl Node {
    pub(crate) fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        for (id, k) in [("a", KA), ("b", KB)] {
            let t = dir.path().join(format!("tree-{id}"));
            tree(&t, k, id);
            let o = PublishOptions {
                store: store.clone(),
                id: id.into(),
                keys: Vec::new(),
                timestamp_key: None,
                timestamp_hours: crate::publish::trust::DEFAULT_INDEX_HOURS,
                parent: None,
                no_delta: false,
                level: 1,
                threads: 2,
                // One channel per image: the tests move between them freely.
                channel: format!("test-{id}"),
                release: None,
                compatible: None,
            };
            let r = publish::publish(&o, &t, &Progress::new(true)).unwrap();
            assert_eq!(
                r.kernel.as_deref(),
                Some(k),
                "kernel detection of image {id}"
            );
        }
        // Adopt `a` over a copy of its tree, as a node built from it would.
        let root = dir.path().join("root");
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(dir.path().join("tree-a"))
            .arg(&root)
            .status()
            .unwrap();
        assert!(cp.success());
        let n = Node { dir, root, store };
        n.apply("a", None).unwrap();
        // Adopting `a` on a scratch root counts as a kernel change
        // (nothing recorded before); start from a clean record.
        let _ = std::fs::remove_file(n.root.join("var/lib/imageupd/kernel.json"));
        n
    }

    pub(crate) fn opts(
        &self,
        id: &str,
        policy: Option<KernelPolicy>,
        dry_run: bool,
    ) -> ApplyOptions {
        ApplyOptions {
            root: self.root.clone(),
            from: Some(self.store.display().to_string()),
            id: Some(id.into()),
            allow_unsigned: true,
            allow_downgrade: false,
            kernel_policy: policy,
            dry_run,
            cancel: None,
            ca_file: None,
            slot: None,
            keep_replaced: false,
            tracker: None,
        }
    }

    fn apply(&self, id: &str, policy: Option<KernelPolicy>) -> Result<ApplyReport> {
        apply::run(&self.opts(id, policy, false), &Progress::new(true))
    }

    pub(crate) fn rootfs(&self) -> RootFs {
        RootFs::open(&self.root).unwrap()
    }

    pub(crate) fn record(&self) -> KernelRecord {
        load(&self.rootfs()).unwrap().expect("a kernel record")
    }

    fn cmdline(&self) -> PathBuf {
        let p = self.dir.path().join("cmdline");
        std::fs::write(&p, "console=ttyS0 root=/dev/vda ro quiet\n").unwrap();
        p
    }

    fn hook(&self, body: &str) {
        let d = self.root.join("etc/imageupd/hooks/pre-reboot.d");
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("10-mark");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    pub(crate) fn actuator(&self, bus: &str, loader: FakeLoader) -> Actuator {
        Actuator {
            bus: Bus::Address(bus.into()),
            loader: Box::new(loader),
            cmdline_path: self.cmdline(),
            any_root: true,
        }
    }

    /// Apply `b` with `policy`, then act again through `act` as the host
    /// would (apply::run itself never acts on a scratch root).
    fn apply_b_and_act(&self, act: &Actuator, policy: KernelPolicy) -> ApplyReport {
        let mut r = self.apply("b", Some(policy)).unwrap();
        assert_eq!(
            r.kernel.action.as_deref(),
            Some(if policy == KernelPolicy::Defer {
                "deferred"
            } else {
                "not-host-root"
            })
        );
        let cfg = Config::load(&self.root).unwrap();
        after_apply(
            act,
            &self.rootfs(),
            &cfg,
            policy,
            &mut r,
            &Progress::new(true),
        );
        r
    }
}

fn calls(f: &Fakes) -> Vec<String> {
    f.calls.lock().unwrap().clone()
}

#[test]
fn plan_and_defer_record_why_a_reboot_is_needed() {
    let n = Node::new();
    let plan = apply::run(&n.opts("b", None, true), &Progress::new(true)).unwrap();
    assert!(plan.kernel.changed);
    assert_eq!(plan.kernel.target_release.as_deref(), Some(KB));
    assert!(
        plan.kernel
            .reason
            .as_deref()
            .unwrap()
            .contains("from 1.0-a to 2.0-b"),
        "{:?}",
        plan.kernel
    );
    assert!(plan.kernel.action.is_none(), "a plan acts on nothing");
    assert!(
        load(&n.rootfs()).unwrap().is_none(),
        "a plan records nothing"
    );
    let summary = apply::human_summary(&plan);
    assert!(
        summary.contains("must boot 2.0-b") && summary.contains("policy kexec"),
        "{summary}"
    );

    let r = n.apply("b", Some(KernelPolicy::Defer)).unwrap();
    assert_eq!(r.kernel.action.as_deref(), Some("deferred"));
    let rec = n.record();
    assert_eq!(
        (
            rec.state,
            rec.action,
            rec.image_id.as_str(),
            rec.from_image.as_deref()
        ),
        (KernelState::Pending, Action::Deferred, "b", Some("a"))
    );
    assert_eq!(rec.target.release, KB);
    assert_eq!(
        rec.target.vmlinuz.as_ref().unwrap().to_string(),
        format!("/boot/vmlinuz-{KB}")
    );
    assert!(
        rec.describe().contains("imageupd reboot"),
        "{}",
        rec.describe()
    );
}

#[test]
fn a_scratch_root_is_not_acted_on_without_the_flag() {
    let n = Node::new();
    let bus = PrivateBus::start();
    let fakes = serve(&bus.address, Some(false));
    let loader = FakeLoader::default();
    let seen = loader.seen.clone();
    let mut act = n.actuator(&bus.address, loader);
    act.any_root = false;
    let r = n.apply_b_and_act(&act, KernelPolicy::Kexec);
    assert_eq!(r.kernel.action.as_deref(), Some("not-host-root"));
    assert!(seen.lock().unwrap().is_empty() && calls(&fakes).is_empty());
    assert_eq!(n.record().action, Action::NotHostRoot);
}

#[test]
fn kexec_loads_the_new_kernel_with_the_running_cmdline_then_starts_kexec_target() {
    let n = Node::new();
    let bus = PrivateBus::start();
    let fakes = serve(&bus.address, Some(false));
    let mark = n.dir.path().join("hook-ran");
    n.hook(&format!("touch {}", mark.display()));
    let loader = FakeLoader {
        must_exist: Some(mark.clone()),
        ..Default::default()
    };
    let seen = loader.seen.clone();
    let unloads = loader.unloads.clone();
    let r = n.apply_b_and_act(&n.actuator(&bus.address, loader), KernelPolicy::Kexec);
    assert_eq!(
        r.kernel.action.as_deref(),
        Some("kexec"),
        "{:?}",
        r.warnings
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let (k, i, c, bytes) = &seen[0];
    assert_eq!(
        (k.as_str(), i.as_str(), c.as_str()),
        (
            &*format!("/boot/vmlinuz-{KB}"),
            &*format!("/boot/initrd.img-{KB}"),
            "console=ttyS0 root=/dev/vda ro quiet"
        )
    );
    assert_eq!(
        bytes,
        format!("kernel {KB}").as_bytes(),
        "the descriptor must be the updated root's kernel"
    );
    assert_eq!(
        calls(&fakes),
        ["StartUnit kexec.target replace-irreversibly"]
    );
    assert_eq!(*unloads.lock().unwrap(), 0);
    let rec = n.record();
    assert_eq!(
        (rec.state, rec.action, rec.policy),
        (KernelState::Pending, Action::Kexec, KernelPolicy::Kexec)
    );
    assert!(rec.requested_ms.is_some() && rec.action_error.is_none());
}

#[test]
fn a_failed_kexec_load_falls_back_to_a_reboot() {
    let n = Node::new();
    let bus = PrivateBus::start();
    let fakes = serve(&bus.address, Some(false));
    let loader = FakeLoader {
        fail: true,
        ..Default::default()
    };
    let r = n.apply_b_and_act(&n.actuator(&bus.address, loader), KernelPolicy::Kexec);
    assert_eq!(r.kernel.action.as_deref(), Some("reboot"));
    assert_eq!(calls(&fakes), ["Reboot false"]);
    let rec = n.record();
    assert_eq!(rec.action, Action::Reboot);
    assert!(
        rec.action_error
            .as_deref()
            .unwrap()
            .contains("Exec format error"),
        "{rec:?}"
    );
}

#[test]
fn a_kernel_that_does_not_match_the_manifest_is_never_loaded() {
    let n = Node::new();
    let bus = PrivateBus::start();
    let fakes = serve(&bus.address, Some(false));
    let loader = FakeLoader::default();
    let seen = loader.seen.clone();
    let act = n.actuator(&bus.address, loader);
    let mut r = n.apply("b", Some(KernelPolicy::Kexec)).unwrap();
    std::fs::write(n.root.join(format!("boot/vmlinuz-{KB}")), "evil kernel").unwrap();
    let cfg = Config::load(&n.root).unwrap();
    after_apply(
        &act,
        &n.rootfs(),
        &cfg,
        KernelPolicy::Kexec,
        &mut r,
        &Progress::new(true),
    );
    assert!(seen.lock().unwrap().is_empty());
    assert_eq!(calls(&fakes), ["Reboot false"]);
    let err = n.record().action_error.unwrap();
    assert!(
        err.contains(&format!("boot/vmlinuz-{KB}")) && err.contains("does not match"),
        "{err}"
    );
}

#[test]
fn policy_reboot_and_a_failing_pre_reboot_hook() {
    let n = Node::new();
    let bus = PrivateBus::start();
    let fakes = serve(&bus.address, None);
    n.hook("echo 'cannot drain this node' >&2; exit 3");
    let loader = FakeLoader::default();
    let seen = loader.seen.clone();
    let act = n.actuator(&bus.address, loader);
    let r = n.apply_b_and_act(&act, KernelPolicy::Reboot);
    assert_eq!(r.kernel.action.as_deref(), Some("deferred"));
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("pre-reboot hook") && w.contains("cannot drain this node")),
        "{:?}",
        r.warnings
    );
    assert!(calls(&fakes).is_empty() && seen.lock().unwrap().is_empty());
    let rec = n.record();
    assert_eq!(
        (rec.state, rec.action),
        (KernelState::Pending, Action::Deferred)
    );

    // Fixed: `imageupd reboot` acts with the requested policy; no logind
    // on this bus, so the reboot goes to systemd.
    std::fs::remove_file(n.root.join("etc/imageupd/hooks/pre-reboot.d/10-mark")).unwrap();
    let cfg = Config::load(&n.root).unwrap();
    let a = reboot_now(
        &act,
        &n.rootfs(),
        &cfg,
        Some(KernelPolicy::Reboot),
        &Progress::new(true),
    )
    .unwrap();
    assert_eq!(a, Some(Action::Reboot));
    assert_eq!(
        calls(&fakes),
        ["StartUnit reboot.target replace-irreversibly"]
    );
    assert!(
        seen.lock().unwrap().is_empty(),
        "policy reboot never loads a kernel"
    );
}

#[test]
fn reboot_now_kexecs_a_deferred_change_and_nothing_else() {
    let n = Node::new();
    let bus = PrivateBus::start();
    let fakes = serve(&bus.address, Some(false));
    let act = n.actuator(&bus.address, FakeLoader::default());
    let cfg = Config::load(&n.root).unwrap();
    assert_eq!(
        reboot_now(&act, &n.rootfs(), &cfg, None, &Progress::new(true)).unwrap(),
        None,
        "nothing pending"
    );
    n.apply("b", Some(KernelPolicy::Defer)).unwrap();
    assert!(calls(&fakes).is_empty(), "defer acts on nothing");
    let mut cfg = cfg;
    cfg.kernel_policy = KernelPolicy::Defer;
    assert_eq!(
        reboot_now(&act, &n.rootfs(), &cfg, None, &Progress::new(true)).unwrap(),
        Some(Action::Kexec)
    );
    assert_eq!(
        calls(&fakes),
        ["StartUnit kexec.target replace-irreversibly"]
    );
}

#[test]
fn without_a_bus_the_reboot_stays_required() {
    let n = Node::new();
    let act = n.actuator(
        "unix:path=/nonexistent/imageupd-test-bus",
        FakeLoader::default(),
    );
    let r = n.apply_b_and_act(&act, KernelPolicy::Reboot);
    assert_eq!(r.kernel.action.as_deref(), Some("failed"));
    let rec = n.record();
    assert_eq!(
        (rec.state, rec.action),
        (KernelState::Pending, Action::Failed)
    );
    assert!(
        rec.action_error
            .as_deref()
            .unwrap()
            .contains("/nonexistent/imageupd-test-bus"),
        "{rec:?}"
    );
    assert!(
        rec.describe().contains("could not be requested"),
        "{}",
        rec.describe()
    );
}

#[test]
fn the_boot_check_settles_a_pending_change() {
    let n = Node::new();
    n.apply("b", Some(KernelPolicy::Defer)).unwrap();
    let root = n.rootfs();
    let mut rec = n.record();
    rec.action = Action::Kexec;
    rec.boot_id = Some("boot-1".into());
    rec.requested_ms = Some(epoch_ms() - 5_000);
    // Same boot, old kernel: nothing happened yet.
    assert!(!confirm(&root, &mut rec.clone(), Some(KA), Some("boot-1")).unwrap());
    // Another boot, but the old kernel: failed, with the reason.
    let mut failed = rec.clone();
    assert!(confirm(&root, &mut failed, Some(KA), Some("boot-2")).unwrap());
    assert_eq!(failed.state, KernelState::Failed);
    let err = failed.error.clone().unwrap();
    assert!(err.contains(KA) && err.contains(KB), "{err}");
    assert_eq!(n.record(), failed, "the outcome is saved");
    // The target kernel runs: complete.
    assert!(confirm(&root, &mut rec, Some(KB), Some("boot-2")).unwrap());
    assert_eq!(rec.state, KernelState::Complete);
    assert_eq!(rec.booted_release.as_deref(), Some(KB));
    assert!(rec.request_to_confirm_ms.unwrap() >= 5_000);
    // A deferred change in the same boot stays pending.
    let mut deferred = n.record();
    deferred.state = KernelState::Pending;
    deferred.action = Action::Deferred;
    assert!(!confirm(&root, &mut deferred, Some(KA), Some("boot-9")).unwrap());
}

#[test]
fn a_rollback_to_the_running_kernel_supersedes_the_pending_change() {
    let n = Node::new();
    n.apply("b", Some(KernelPolicy::Defer)).unwrap();
    let mut r = ApplyReport {
        result: "applied".into(),
        id: "a".into(),
        ..Default::default()
    };
    let act = n.actuator("unix:path=/nonexistent", FakeLoader::default());
    after_apply(
        &act,
        &n.rootfs(),
        &Config::default(),
        KernelPolicy::Kexec,
        &mut r,
        &Progress::new(true),
    );
    assert_eq!(n.record().state, KernelState::Superseded);
    assert!(r.kernel.action.is_none());
}

#[test]
fn stale_module_directories_go_once_another_kernel_runs() {
    let n = Node::new();
    n.apply("b", Some(KernelPolicy::Defer)).unwrap();
    // The old kernel's modules, as the apply keeps them while it runs, a
    // stray release, and one the operator preserves.
    for r in [KA, "0.9-stray", "keep-me"] {
        write(
            &n.root.join(format!("usr/lib/modules/{r}/modules.dep")),
            "x",
        );
    }
    std::fs::write(n.root.join("usr/lib/modules/not-a-dir"), "x").unwrap();
    write(
        &n.root.join("etc/imageupd/config.d/50-keep.toml"),
        "preserve_extra = [\"/usr/lib/modules/keep-me/\"]\n",
    );
    let cfg = Config::load(&n.root).unwrap();
    let root = n.rootfs();
    let image_mtime = std::fs::metadata(n.dir.path().join("tree-b/usr/lib/modules"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        prune_stale_modules(&root, &cfg, KA).unwrap(),
        ["usr/lib/modules/0.9-stray"]
    );
    assert_eq!(
        std::fs::metadata(n.root.join("usr/lib/modules"))
            .unwrap()
            .modified()
            .unwrap(),
        image_mtime,
        "the image's mtime again"
    );
    assert!(
        n.root.join(format!("usr/lib/modules/{KA}")).is_dir(),
        "the running kernel's modules stay"
    );
    assert_eq!(
        prune_stale_modules(&root, &cfg, KB).unwrap(),
        [format!("usr/lib/modules/{KA}")]
    );
    for keep in [KB, "keep-me", "not-a-dir"] {
        assert!(
            n.root.join("usr/lib/modules").join(keep).exists(),
            "{keep} must stay"
        );
    }
    assert!(prune_stale_modules(&root, &cfg, KB).unwrap().is_empty());
}
