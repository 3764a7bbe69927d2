//! End to end in a VM: real Debian bookworm images with systemd and the
//! cloud kernel, booted under qemu (TCG), updated in place by imageupd
//! running inside the guest.
//!
//! Images (trees from tests/fixtures/build-vm-trees.sh, with the imageupd
//! binary, its units and the guest harness of tests/vm/guest laid over
//! them through overlayfs):
//!
//! - v1: kernel 6.1.0-47-cloud-amd64, `vm-hello` says "hello from v1";
//! - v2: v1 with only `vm-hello` changed (a userspace-only update);
//! - v3: kernel 6.1.0-50-cloud-amd64 instead, `vm-hello` says v3.
//!
//! The guest boots v1 with direct kernel boot, a read-only root on
//! /dev/vda and the store plus the metadata on /dev/vdb. The host talks to
//! the guest harness through the second serial port and reads markers from
//! the console log. Scenarios:
//!
//! 1. v1 → v2 in place: `vm-hello` answers v2, same boot id, `imageupd
//!    verify` clean in the guest;
//! 2. v2 → v3 with policy kexec: the node's pre-reboot hook runs, then the
//!    guest comes back on the new kernel
//!    with a new boot id, image v3, the kernel record complete, the old
//!    kernel's modules gone, `verify` clean;
//! 3. v1 → v3 with policy reboot. With direct kernel boot a reboot would
//!    start the same `-kernel` again, so the test plays the boot loader: qemu
//!    runs with `-no-reboot` and exits when the guest reboots, the test reads
//!    the `/vmlinuz` and `/initrd.img` links of the updated disk (what a boot
//!    loader's default entry points at) and starts qemu again with them.
//!
//! Who applies inside the guest is [`DRIVER`]: the agent, or a oneshot unit
//! that runs `imageupd apply --id <id from the metadata> --kernel-policy
//! <p>`. Switching is that one line.
//!
//! Needs root, qemu-system-x86_64, mkfs.ext4, overlayfs, and the network
//! for the first build of the trees. `IMAGEUPD_TEST_NO_VM=1` skips (and
//! says so). `IMAGEUPD_VM_DEBUG=1` forwards the guest's journal to the
//! console log.

mod common;

use std::time::{Duration, Instant};

use common::vm::*;
use common::*;

/// Kernel detection on the real trees, and what `plan` says about it.
#[test]
fn kernel_detection_on_real_images() {
    if skip() {
        return;
    }
    let p = prep();
    for (id, rel, tree) in [
        ("v1", K_OLD, "k47"),
        ("v2", K_OLD, "k47"),
        ("v3", K_NEW, "k50"),
    ] {
        let k = &read_manifest(&p.store, id)["kernel"];
        assert_eq!(k["release"], rel, "kernel of {id}: {k}");
        let boot = cache_dir().join("vm").join(tree).join("boot");
        assert_eq!(
            k["vmlinuz_sha256"],
            sha256_file(&boot.join(format!("vmlinuz-{rel}"))),
            "vmlinuz digest of {id}"
        );
        assert_eq!(
            k["initrd_sha256"],
            sha256_file(&boot.join(format!("initrd.img-{rel}"))),
            "initrd digest of {id}"
        );
        assert!(
            k["vmlinuz"]
                .as_str()
                .unwrap()
                .ends_with(&format!("boot/vmlinuz-{rel}")),
            "{k}"
        );
    }
    assert_eq!(
        p.plan_v2["kernel"]["changed"], false,
        "v1 -> v2 keeps the kernel: {}",
        p.plan_v2["kernel"]
    );
    let k3 = &p.plan_v3["kernel"];
    assert_eq!(k3["changed"], true, "{k3}");
    assert_eq!(k3["target_release"], K_NEW);
    assert_eq!(k3["policy"], "kexec", "the node's configured policy: {k3}");
    let why = k3["reason"].as_str().unwrap();
    assert!(why.contains(K_OLD) && why.contains(K_NEW), "{why}");
    assert!(
        p.plan_v3_text.contains(&format!("must boot {K_NEW}")),
        "{}",
        p.plan_v3_text
    );
}

/// The kernel commands on a scratch root (never acted on): a deferred
/// change shows in `status`, `reboot` and `boot-check` leave it alone.
#[test]
fn kernel_commands_on_a_scratch_root() {
    if skip() {
        return;
    }
    let p = prep();
    let key_pub = p.dir.join("keys/vm.pub");
    let up = p.dir.join("cli-upper");
    std::fs::create_dir_all(up.join("etc/imageupd/trusted.d")).unwrap();
    std::fs::copy(&key_pub, up.join("etc/imageupd/trusted.d/vm.pub")).unwrap();
    let k47 = cache_dir().join("vm/k47");
    let ov = Overlay::mount(
        &[&p.dir.join("layer-v1"), &k47],
        &up,
        &p.dir.join("cli-work"),
        &p.dir.join("cli-root"),
    );
    let root = ov.merged.clone();
    apply(&p.store, "v1", &root, &[]).expect_ok();
    let out = apply(&p.store, "v3", &root, &["--kernel-policy", "defer"]).expect_ok();
    let k = &out.json()["kernel"];
    assert_eq!(
        (k["changed"].as_bool(), k["action"].as_str()),
        (Some(true), Some("deferred")),
        "{}",
        out.describe()
    );
    let st = imageupd(["status", "--json", "--root"])
        .arg(&root)
        .ok()
        .json();
    assert_eq!(st["kernel"]["reboot_required"], true, "{st}");
    assert_eq!(st["kernel"]["record"]["target"]["release"], K_NEW, "{st}");
    let text = imageupd(["status", "--root"]).arg(&root).ok().stdout;
    assert!(
        text.contains(&format!("reboot required into {K_NEW}")) && text.contains("imageupd reboot"),
        "{text}"
    );
    let out = imageupd(["reboot", "--root"]).arg(&root).ok();
    assert!(out.stdout.contains("not-host-root"), "{}", out.describe());
    let st = imageupd(["status", "--json", "--root"])
        .arg(&root)
        .ok()
        .json();
    assert_eq!(st["kernel"]["record"]["action"], "not-host-root", "{st}");
    let bc = imageupd(["boot-check", "--json", "--root"])
        .arg(&root)
        .ok()
        .json();
    assert_eq!(
        (bc["confirmed"].as_bool(), bc["record"]["state"].as_str()),
        (Some(false), Some("pending")),
        "{bc}"
    );
    assert!(root.join(format!("usr/lib/modules/{K_NEW}")).is_dir());
}

/// Scenarios 1 to 3 (see the module documentation), in one test so the
/// VMs never run at the same time.
#[test]
fn vm_in_place_kexec_and_reboot() {
    if skip() {
        return;
    }
    let p = prep();
    let mut times: Vec<(String, Duration)> = vec![("prepare images, store, disks".into(), p.took)];
    let (k1, i1) = v1_kernel();

    // --- VM A: v1 -> v2 in place, then v2 -> v3 with kexec.
    let root = copy_disk(&p.root_kexec, "a", p);
    let data = data_disk(p, "a");
    let t = Instant::now();
    let mut vm = Vm::boot("a", &p.dir, &k1, &i1, &root, &data);
    let ready = vm.wait("ready", BOOT_TIMEOUT, |_| true);
    times.push(("boot v1 (qemu start -> harness ready)".into(), t.elapsed()));
    assert_eq!(
        (
            ready.get("uname"),
            ready.get("image_id"),
            ready.get("hello")
        ),
        (K_OLD, "v1", "hello-from-v1"),
        "{ready:?}"
    );
    let boot1 = ready.get("boot_id").to_string();

    // 1. v2 in place.
    let t = Instant::now();
    vm.metadata("v2", "kexec");
    let mut n = 0;
    let pr = loop {
        n += 1;
        let pr = vm.probe(&format!("v2-{n}"));
        if pr.get("image_id") == "v2" && pr.get("hello") == "hello-from-v2" {
            break pr;
        }
        assert!(
            t.elapsed() < APPLY_TIMEOUT,
            "v2 not applied within {APPLY_TIMEOUT:?}: {pr:?}\n{}",
            vm.console_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    times.push((
        "v2 in place: metadata write -> service answers v2".into(),
        t.elapsed(),
    ));
    assert_eq!(
        pr.get("boot_id"),
        boot1,
        "an update without a kernel change must not reboot"
    );
    assert_eq!(pr.get("uname"), K_OLD);
    // The root shows v2 at the commit; the records are written when the
    // apply (and, with the agent, its bookkeeping) has finished.
    let mut st = status_of(&pr);
    let t_rec = Instant::now();
    while st["status"]["result"] != "applied"
        || (DRIVER == Driver::Agent && st["agent"]["last_applied"]["id"] != "v2")
    {
        assert!(
            t_rec.elapsed() < COMMAND_TIMEOUT,
            "the apply of v2 was not recorded: {st}"
        );
        std::thread::sleep(Duration::from_secs(1));
        st = status_of(&vm.probe(&format!("v2-record-{}", t_rec.elapsed().as_millis())));
    }
    assert_eq!(st["kernel"]["reboot_required"], false, "{st}");
    assert_eq!(st["status"]["reboot_required"], false, "{st}");
    if let Some(ms) = st["agent"]["last_applied"]["metadata_to_commit_ms"].as_u64() {
        times.push((
            "v2 in place: metadata write -> commit (agent's record)".into(),
            Duration::from_millis(ms),
        ));
    }
    if let Some(ms) = st["status"]["quiesce_ms"].as_u64() {
        times.push((
            "v2 in place: quiesce window".into(),
            Duration::from_millis(ms),
        ));
    }
    let v = vm.verify("after-v2");
    assert_eq!(
        v.get("rc"),
        "0",
        "imageupd verify in the guest after v2:\n{}",
        v.b64("out")
    );

    // 2. v3 with kexec.
    let t = Instant::now();
    vm.metadata("v3", "kexec");
    let hook = vm.wait("pre-reboot", APPLY_TIMEOUT, |_| true);
    assert_eq!(
        (hook.get("to"), hook.get("changed")),
        ("v3", "1"),
        "{hook:?}"
    );
    let ready = vm.wait("ready", BOOT_TIMEOUT + APPLY_TIMEOUT, |m| {
        m.kv.get("boot_id") != Some(&boot1)
    });
    times.push((
        "v3 kexec: metadata write -> new kernel's harness ready".into(),
        t.elapsed(),
    ));
    assert_eq!(
        (
            ready.get("uname"),
            ready.get("image_id"),
            ready.get("hello")
        ),
        (K_NEW, "v3", "hello-from-v3"),
        "{ready:?}"
    );
    let pr = vm.probe("after-kexec");
    let st = status_of(&pr);
    let rec = &st["kernel"]["record"];
    assert_eq!(rec["state"], "complete", "{st}");
    assert_eq!(rec["action"], "kexec", "{st}");
    assert_eq!(rec["booted_release"], K_NEW);
    assert_eq!(st["kernel"]["reboot_required"], false);
    assert_eq!(
        pr.get("modules"),
        format!("{K_NEW},"),
        "the old kernel's modules must be gone once the new one runs"
    );
    if let Some(ms) = rec["request_to_confirm_ms"].as_u64() {
        times.push((
            "v3 kexec: kexec requested -> boot check (guest clock)".into(),
            Duration::from_millis(ms),
        ));
    }
    let v = vm.verify("after-kexec");
    assert_eq!(
        v.get("rc"),
        "0",
        "imageupd verify in the guest after the kexec:\n{}",
        v.b64("out")
    );
    vm.poweroff();

    // --- VM B: 3. v1 -> v3 with policy reboot.
    let root = copy_disk(&p.root_reboot, "b", p);
    let data = data_disk(p, "b");
    let mut vm = Vm::boot("b", &p.dir, &k1, &i1, &root, &data);
    let ready = vm.wait("ready", BOOT_TIMEOUT, |_| true);
    assert_eq!(
        (ready.get("uname"), ready.get("image_id")),
        (K_OLD, "v1"),
        "{ready:?}"
    );
    let boot1 = ready.get("boot_id").to_string();
    let t = Instant::now();
    vm.metadata("v3", "reboot");
    vm.wait("pre-reboot", APPLY_TIMEOUT, |m| {
        m.kv.get("to").map(String::as_str) == Some("v3")
    });
    vm.wait_exit(BOOT_TIMEOUT + APPLY_TIMEOUT);
    times.push((
        "v3 reboot: metadata write -> guest reset".into(),
        t.elapsed(),
    ));
    drop(vm);
    let (k3, i3, id, rec, modules) = boot_loader(&root, &p.dir);
    assert_eq!(
        modules,
        [K_OLD, K_NEW],
        "the apply keeps the running kernel's modules until the node runs another"
    );
    assert_eq!(id, "v3", "the disk must hold v3 when the guest reboots");
    assert_eq!(
        (rec["state"].as_str(), rec["action"].as_str()),
        (Some("pending"), Some("reboot")),
        "{rec}"
    );
    assert!(k3.exists() && i3.exists());
    let mut vm = Vm::boot("b2", &p.dir, &k3, &i3, &root, &data);
    let ready = vm.wait("ready", BOOT_TIMEOUT, |_| true);
    times.push((
        "v3 reboot: metadata write -> new kernel's harness ready".into(),
        t.elapsed(),
    ));
    assert_ne!(ready.get("boot_id"), boot1);
    assert_eq!(
        (
            ready.get("uname"),
            ready.get("image_id"),
            ready.get("hello")
        ),
        (K_NEW, "v3", "hello-from-v3"),
        "{ready:?}"
    );
    let st = status_of(&vm.probe("after-reboot"));
    let rec = &st["kernel"]["record"];
    assert_eq!(
        (rec["state"].as_str(), rec["action"].as_str()),
        (Some("complete"), Some("reboot")),
        "{st}"
    );
    vm.poweroff();

    eprintln!("vm timings (driver {DRIVER:?}, qemu TCG, host load included):");
    for (what, d) in &times {
        eprintln!("  {:>7.1} s  {what}", d.as_secs_f64());
    }
    // The disks these VMs wrote (the prepared ones stay for other tests).
    if std::env::var_os("IMAGEUPD_TEST_KEEP").is_none() {
        for name in ["a.root.img", "a.data.img", "b.root.img", "b.data.img"] {
            let _ = std::fs::remove_file(p.dir.join(name));
        }
    }
}
