//! A kernel-changing image rolled out with `[rollout]` keeps its node's
//! slot across the reboot (issue 11), against a real etcd and the real
//! pipeline on a scratch root (the two tiny images of
//! [`crate::apply::kernel_tests`], kernels 1.0-a and 2.0-b). The reboot is
//! requested through the reboot actuator on a private bus with fake
//! systemd/logind, as the host would; "the boot" is the agent's start
//! sequence on the new kernel: a fresh [`Rollout`] (the old process and
//! its lease are gone), the boot check ([`confirm`] with the running
//! release 2.0-b), then [`recover`].
//!
//! Checked: the claim stays through the reboot while the node's lease
//! expires; another node of the group cannot take the slot meanwhile; the
//! gate has not run before the boot and runs after it; the slot is
//! released then, and the other node gets it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::slot::SlotPhase;
use super::*;
use crate::apply::kernel_tests::{FakeLoader, Node, KB};
use crate::boot::confirm::confirm;
use crate::boot::dbus::testbus::{serve, PrivateBus};
use crate::boot::reboot::after_apply;
use crate::boot::record::{load, KernelState};
use crate::engine::config::KernelPolicy;

/// How long etcd may take to answer after start.
const ETCD_STARTUP: Duration = Duration::from_secs(30);
/// Lease of the test nodes, s (etcd's minimum is 2).
const LEASE_SECS: u64 = 2;

/// A real etcd on free loopback ports, data on tmpfs; killed on drop.
struct Etcd {
    child: Child,
    url: String,
    _data: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Etcd {
    fn start() -> Etcd {
        assert!(
            Path::new("/usr/bin/etcd").exists(),
            "/usr/bin/etcd is missing: tests/setup.sh installs etcd-server"
        );
        let data = tempfile::Builder::new()
            .prefix("imageupd-etcd-unit-")
            .tempdir_in("/dev/shm")
            .expect("tmpfs dir");
        let (port, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{port}");
        let peer = format!("http://127.0.0.1:{peer}");
        let child = Command::new("/usr/bin/etcd")
            .args(["--name", "t1", "--data-dir"])
            .arg(data.path().join("d"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("t1={peer}")])
            .args(["--initial-cluster-state", "new"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd");
        let e = Etcd {
            child,
            url,
            _data: data,
        };
        let client = etcd::Etcd::new(&etcd::EtcdOptions {
            endpoints: vec![e.url.clone()],
            ..Default::default()
        })
        .expect("etcd client");
        let t = Instant::now();
        while client.range_prefix("/probe").is_err() {
            assert!(t.elapsed() < ETCD_STARTUP, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Err(e) = self.child.kill() {
            eprintln!("killing the test etcd: {e}");
        }
        if let Err(e) = self.child.wait() {
            eprintln!("reaping the test etcd: {e}");
        }
    }
}

/// Give `n` a `[rollout]` (node `id`, one slot) and a required check that
/// logs each run's target to `log`.
fn configure(n: &Node, url: &str, id: &str, log: &Path) -> Config {
    let d = n.root.join("etc/imageupd");
    std::fs::create_dir_all(d.join("health.d/required.d")).unwrap();
    std::fs::write(
        d.join("config.toml"),
        format!(
            "[health]\ntimeout_secs = 10\n\n[rollout]\netcd = [\"{url}\"]\ngroup = \"g\"\nnode_id = \"{id}\"\nmax_unavailable = 1\nlease_secs = {LEASE_SECS}\npoll_ms = 100\n"
        ),
    )
    .unwrap();
    let check = d.join("health.d/required.d/10-booted");
    std::fs::write(
        &check,
        format!("#!/bin/sh\necho \"$IMAGEUPD_TO\" >> {}\n", log.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&check, std::fs::Permissions::from_mode(0o755)).unwrap();
    Config::load(&n.root).unwrap()
}

fn rollout(n: &Node, cfg: &Config) -> (Arc<Rollout>, PathBuf) {
    let rt = RootFs::open(&n.root).unwrap().runtime_dir();
    let r = Rollout::open(&n.root, &rt, cfg)
        .unwrap()
        .expect("a [rollout] table");
    (r, rt)
}

/// Claims of the group now: (slot, node, target).
fn claims(r: &Rollout) -> Vec<(u32, String, String)> {
    r.view()
        .unwrap()
        .claims
        .iter()
        .map(|(i, c)| (*i, c.node.clone(), c.target.clone()))
        .collect()
}

/// `r.acquire(target)` for at most `limit`, its lease kept alive meanwhile
/// (the agent's heartbeat thread does that); an error when no slot was
/// taken in time.
fn try_acquire(r: &Arc<Rollout>, target: &str, limit: Duration) -> anyhow::Result<u32> {
    let cancel = Arc::new(AtomicBool::new(false));
    r.set_cancel(cancel.clone());
    let done = Arc::new(AtomicBool::new(false));
    let (me, stop, over) = (r.clone(), cancel.clone(), done.clone());
    let beat = std::thread::spawn(move || {
        let t = Instant::now();
        while !over.load(Ordering::SeqCst) {
            if let Err(e) = me.heartbeat() {
                eprintln!("heartbeat: {e:#}");
            }
            if t.elapsed() >= limit {
                stop.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let got = r.acquire(target);
    done.store(true, Ordering::SeqCst);
    beat.join().unwrap();
    got
}

#[test]
fn a_kernel_change_keeps_its_slot_across_the_reboot_then_gates_and_releases() {
    let etcd = Etcd::start();
    let (n1, n2) = (Node::new(), Node::new());
    let gate_log = n1.dir.path().join("gate-ran");
    let cfg1 = configure(&n1, &etcd.url, "n1", &gate_log);
    let cfg2 = configure(&n2, &etcd.url, "n2", &n2.dir.path().join("gate-ran"));
    let progress = Progress::new(true);
    let (r1, rt1) = rollout(&n1, &cfg1);
    let (r2, rt2) = rollout(&n2, &cfg2);
    r2.publish("idle", "registered", None);

    // n1 applies b (kernel 2.0-b) with policy reboot, inside its slot.
    let mut opts = n1.opts("b", Some(KernelPolicy::Reboot), false);
    opts.slot = Some(r1.clone() as Arc<dyn SlotGate>);
    opts.keep_replaced = keeps_replaced(&n1.root, &cfg1);
    let mut rep = crate::apply::run(&opts, &progress).unwrap();
    assert!(rep.kernel.changed, "{:?}", rep.kernel);
    // As the host would: the actuator asks logind to reboot.
    let bus = PrivateBus::start();
    let fakes = serve(&bus.address, Some(false));
    let act = n1.actuator(&bus.address, FakeLoader::default());
    after_apply(
        &act,
        &n1.rootfs(),
        &cfg1,
        KernelPolicy::Reboot,
        &mut rep,
        &progress,
    );
    assert_eq!(rep.kernel.action.as_deref(), Some("reboot"), "{:?}", rep);
    assert!(
        fakes
            .calls
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.to_lowercase().contains("reboot")),
        "logind was asked to reboot: {:?}",
        fakes.calls.lock().unwrap()
    );
    let settled = settle(&n1.root, &cfg1, Some(&r1), "b", Ok(rep), &progress);
    assert!(settled.is_ok(), "{settled:?}");
    assert_eq!(r1.phase(), SlotPhase::AcrossReboot);
    assert!(
        !gate_log.exists(),
        "the gate waits for the boot into the new kernel"
    );
    assert_eq!(claims(&r2), [(0, "n1".into(), "b".into())]);

    // The node is down: its process (and lease) gone, its claim not.
    drop(r1);
    std::thread::sleep(Duration::from_secs(LEASE_SECS + 2));
    assert_eq!(
        claims(&r2),
        [(0, "n1".into(), "b".into())],
        "the claim outlives the lease"
    );
    // n2 (alive: its lease is kept up) waits for the slot meanwhile, and
    // does not get it.
    let taken = try_acquire(&r2, "b", Duration::from_secs(3));
    assert!(
        taken.is_err(),
        "n2 took the slot of a node across its reboot: {taken:?}"
    );
    assert_eq!(claims(&r2), [(0, "n1".into(), "b".into())]);

    // The boot: the agent starts on kernel 2.0-b, runs the boot check,
    // finds its claim, gates and releases.
    let mut rec = load(&n1.rootfs()).unwrap().expect("a kernel record");
    confirm(&n1.rootfs(), &mut rec, Some(KB), Some("the-next-boot")).unwrap();
    assert_eq!(rec.state, KernelState::Complete);
    let (r1, _) = rollout(&n1, &cfg1);
    recover(&n1.root, &cfg1, &r1).unwrap();
    assert_eq!(
        std::fs::read_to_string(&gate_log).unwrap(),
        "b\n",
        "the gate ran once, after the boot"
    );
    assert_eq!(r1.phase(), SlotPhase::Idle);
    assert!(claims(&r2).is_empty(), "released after the gate");
    // Now n2 gets it (the control: the same wait does take a free slot).
    assert_eq!(try_acquire(&r2, "b", Duration::from_secs(20)).unwrap(), 0);
    r2.step(SlotEvent::Aborted, None);
    r2.release().unwrap();
    for r in [&r1, &r2] {
        r.shutdown();
    }
    for rt in [rt1, rt2] {
        if let Err(e) = std::fs::remove_dir_all(&rt) {
            eprintln!("removing {}: {e}", rt.display());
        }
    }
}
