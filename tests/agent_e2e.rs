//! `imageupd agent` alone, watching a plain metadata file, over a read-only
//! loop-mounted root with the repository's hooks (hooks/) installed and a
//! fake systemctl:
//!
//! - READY=1 over $NOTIFY_SOCKET, WATCHDOG=1 pings, no CPU burnt when idle;
//! - a half-written metadata file is reported, never acted on;
//! - writing a new image id (under a configured dotted key) leads to a
//!   committed update through inotify alone (the rescan is set far off);
//!   hooks ran in order with the documented environment; status --json
//!   reports the time from the metadata write to the commit;
//! - a failing hook is retried with exponential backoff, never in a hot
//!   loop; SIGHUP retries at once once it is fixed;
//! - SIGTERM while the update is quiesced lets it finish, then exits 0;
//! - an agent killed mid-swap leaves a state the next start converges from;
//! - change tracking never hides a change made behind the agent's back
//!   (modify, create, delete, rename, chmod, chown, setxattr, hardlink;
//!   while it is down; with an overflowing event queue), and a tracker
//!   blind on purpose (the positive control) is caught by the oracle.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::nodekit;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nodekit::*;

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn start(n: &TestNode, notify: &Path, fault: Option<&str>) -> Agent {
        Agent::start_with(n, notify, fault, &[])
    }

    fn start_with(n: &TestNode, notify: &Path, fault: Option<&str>, env: &[(&str, &str)]) -> Agent {
        let log = n.s.join(format!(
            "agent-{}.log",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let f = std::fs::File::create(&log).unwrap();
        let mut c = Command::new(bin());
        c.args(["agent", "--root"])
            .arg(&n.root)
            .env_remove("IMAGEUPD_ROOT")
            .env_remove("OS_CONFIG_FILES")
            .env_remove("IMAGEUPD_FAULT")
            .env("LC_ALL", "C")
            .env("NOTIFY_SOCKET", notify)
            .env("WATCHDOG_USEC", "1000000")
            .env("IMAGEUPD_LOG", "info")
            .env("SYSTEMCTL", n.marks.join("systemctl"))
            .env(
                "IMAGEUPD_CONFIGURE_CMD",
                format!(
                    "echo \"configure mode=$IMAGEUPD_MODE to=$IMAGEUPD_TO\" >> {}/log",
                    n.marks.display()
                ),
            )
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        if let Some(p) = fault {
            c.env("IMAGEUPD_FAULT", p);
        }
        c.env_remove("IMAGEUPD_TEST_UNSAFE_SKIP");
        c.envs(env.iter().copied());
        Agent {
            child: c.spawn().unwrap(),
            log,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait for exit; the exit status.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < limit,
                "agent did not exit within {limit:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// CPU time used so far, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Collects sd_notify datagrams.
struct NotifySocket {
    path: PathBuf,
    msgs: Arc<Mutex<Vec<String>>>,
}

impl NotifySocket {
    fn new(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let m = msgs.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(k) = sock.recv(&mut buf) {
                m.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..k]).into_owned());
            }
        });
        NotifySocket { path, msgs }
    }

    fn all(&self) -> Vec<String> {
        self.msgs.lock().unwrap().clone()
    }

    fn wait(&self, what: &str) {
        wait_for(Duration::from_secs(30), what, || {
            self.all().iter().any(|m| m.contains(what)).then_some(())
        });
    }
}

fn meta_doc(id: &str, store: &Path) -> String {
    serde_json::json!({"deploy": {"images": [{"id": id, "store": store}], "note": "x"}}).to_string()
}

fn agent_status(n: &TestNode) -> serde_json::Value {
    n.status()
}

fn wait_applied(n: &TestNode, a: &Agent, id: &str) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let st = agent_status(n);
        if st["agent"]["last_applied"]["id"] == id
            && st["agent"]["state"] != "applying"
            && st["pending"].is_null()
        {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(300),
            "agent did not apply {id}\nstatus: {st:#}\n--- agent log ---\n{}",
            clip(&a.log(), 80)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agent_follows_metadata_with_hooks_backoff_and_signals() {
    let meta_dir_holder = scratch("agent-meta");
    let meta = meta_dir_holder.join("metadata.json");
    let config = format!(
        "[agent]\nmetadata_file = \"{}\"\nimage_id_key = \"deploy.images.-1.id\"\nimage_source_key = \"deploy.images.-1.store\"\ndebounce_ms = 200\nrescan_secs = 3600\nbackoff_min_secs = 1\nbackoff_max_secs = 4\n",
        meta.display()
    );
    let n = TestNode::new("agent", &config, true);
    let (v2, v3) = (fixture_tree("v2"), fixture_tree("v3"));
    let m = n.marks.display().to_string();
    // The repository's hooks, plus logging hooks, a switchable failing hook
    // and a switchable slow hook.
    n.edit(|r| {
        let hooks = r.join("etc/imageupd/hooks");
        for (phase, name) in [("pre-apply", "10-stop-units"), ("post-apply", "10-daemon-reload"), ("post-apply", "50-configure"), ("post-apply", "90-start-units"), ("abort", "90-start-units")] {
            let dst = hooks.join(format!("{phase}.d")).join(name);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(repo_root().join("hooks").join(format!("{phase}.d")).join(name), &dst).unwrap();
        }
        std::fs::write(r.join("etc/imageupd/quiesce-units"), "# units to stop\nsvc-a.service\nsvc-b.service  # inactive\n\n").unwrap();
        for phase in ["pre-apply", "post-apply", "abort"] {
            write_script(
                &hooks.join(format!("{phase}.d/20-log")),
                &format!(r#"echo "{phase} 20-log mode=$IMAGEUPD_MODE root=$IMAGEUPD_ROOT from=$IMAGEUPD_FROM to=$IMAGEUPD_TO kernel_changed=$IMAGEUPD_KERNEL_CHANGED plan=$(test -s "$IMAGEUPD_PLAN" && echo yes)" >> {m}/log"#),
            );
        }
        write_script(&hooks.join("pre-apply.d/30-maybe-fail"), &format!("if [ -e {m}/fail ]; then echo 'failing on purpose' >&2; exit 1; fi"));
        write_script(&hooks.join("pre-apply.d/40-maybe-slow"), &format!("if [ -e {m}/slow ]; then touch {m}/slow-started; sleep 3; fi"));
    });
    write_script(
        &n.marks.join("systemctl"),
        &format!("echo \"systemctl $*\" >> {m}/log\ncase \"$*\" in *is-active*svc-b*) exit 3;; esac\nexit 0"),
    );
    let sock = NotifySocket::new(n.s.path());
    let mut a = Agent::start(&n, &sock.path, None);
    sock.wait("READY=1");
    let st = agent_status(&n);
    assert_eq!(st["agent"]["agent_pid"], a.child.id(), "{st:#}");

    // Idle: no hot loop.
    std::thread::sleep(Duration::from_millis(500));
    let c0 = a.cpu_ticks();
    std::thread::sleep(Duration::from_secs(3));
    let idle = a.cpu_ticks() - c0;
    assert!(
        idle <= 10,
        "an idle agent used {idle} CPU ticks in 3 s\n{}",
        a.log()
    );
    assert!(
        sock.all().iter().filter(|m| *m == "WATCHDOG=1").count() >= 3,
        "watchdog pings: {:?}",
        sock.all()
    );

    // Half-written metadata: reported, not acted on.
    std::fs::write(&meta, "{\"deploy\": {\"images\": [{\"id\": \"v2\"").unwrap();
    let st = wait_for(
        Duration::from_secs(20),
        "the metadata error in status",
        || {
            let st = agent_status(&n);
            st["agent"]["metadata_error"]
                .as_str()
                .is_some_and(|e| e.contains("not valid JSON"))
                .then_some(st)
        },
    );
    assert_eq!(st["agent"]["state"], "metadata-error", "{st:#}");
    assert_eq!(image_id(&n.root).as_deref(), Some("v1"));

    // A complete write: v2 is applied through inotify.
    let t_write = SystemTime::now();
    write_atomic(&meta, &meta_doc("v2", &n.store));
    let st = wait_applied(&n, &a, "v2");
    let wall = t_write.elapsed().unwrap();
    eprintln!("metadata write → v2 committed: {st:#}");
    assert_applied(&v2, &n.root, "v2", "agent update to v2");
    assert_eq!(n.fs.readonly(), Some(true));
    let la = &st["agent"]["last_applied"];
    let lat = la["metadata_to_commit_ms"]
        .as_u64()
        .expect("metadata_to_commit_ms");
    assert!(
        lat >= 150 && u128::from(lat) <= wall.as_millis() + 1500,
        "metadata→commit {lat} ms, wall {wall:?}"
    );
    let changed = la["metadata_changed_ms"].as_u64().unwrap();
    let t_write_ms = t_write.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    assert!(
        changed.abs_diff(t_write_ms) < 2000,
        "metadata change time {changed} vs write {t_write_ms}"
    );
    assert!(
        la["quiesce_ms"].as_u64().is_some() && la["phases_ms"].is_object(),
        "{st:#}"
    );
    assert_eq!(st["phase"], "idle");
    assert_eq!(st["status"]["result"], "applied");
    assert!(st["agent"]["last_error"].is_null());
    eprintln!("metadata write → commit: {lat} ms (wall {wall:?})");
    let log: Vec<String> = std::fs::read_to_string(n.marks.join("log"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let env = format!(
        "mode=agent root={} from=v1 to=v2 kernel_changed=0 plan=yes",
        n.root.display()
    );
    let want = [
        "systemctl is-active --quiet svc-a.service".to_string(),
        "systemctl is-active --quiet svc-b.service".to_string(),
        "systemctl stop svc-a.service".to_string(),
        format!("pre-apply 20-log {env}"),
        format!("post-apply 20-log {env}"),
        "configure mode=agent to=v2".to_string(),
        "systemctl start svc-a.service".to_string(),
    ];
    let got: Vec<&String> = log
        .iter()
        .filter(|l| !l.contains("daemon-reload"))
        .collect();
    assert_eq!(
        got,
        want.iter().collect::<Vec<_>>(),
        "hook order and environment\n{log:#?}"
    );
    assert!(
        sock.all().iter().any(|m| m.contains("STATUS=applied v2")),
        "{:?}",
        sock.all()
    );

    // A failing hook: backoff 1 s, 2 s, 4 s; never a hot loop.
    std::fs::write(n.marks.join("log"), "").unwrap();
    std::fs::write(n.marks.join("fail"), "").unwrap();
    write_atomic(&meta, &meta_doc("v3", &n.store));
    wait_for(Duration::from_secs(60), "the first failure", || {
        agent_status(&n)["agent"]["failures"]
            .as_object()
            .filter(|f| !f.is_empty())
            .map(|_| ())
    });
    std::thread::sleep(Duration::from_millis(5500));
    let st = agent_status(&n);
    let key = format!("v3@{}", n.store.display());
    let attempts = st["agent"]["failures"][&key]["attempts"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        (2..=4).contains(&attempts),
        "expected 2-4 attempts with 1/2/4 s backoff in ~6 s, got {attempts}\n{st:#}"
    );
    assert!(
        st["agent"]["failures"][&key]["last_error"]
            .as_str()
            .unwrap()
            .contains("failing on purpose"),
        "{st:#}"
    );
    assert_eq!(st["agent"]["state"], "backing-off");
    assert_eq!(image_id(&n.root).as_deref(), Some("v2"));
    assert_eq!(n.fs.readonly(), Some(true));
    let log = std::fs::read_to_string(n.marks.join("log")).unwrap();
    assert!(
        log.contains("abort 20-log")
            && log.matches("systemctl start svc-a.service").count() as u64 >= attempts,
        "abort hooks bring services back\n{log}"
    );
    // Fixed, and SIGHUP: retried at once (the next backoff step is 4 s).
    std::fs::remove_file(n.marks.join("fail")).unwrap();
    let t = Instant::now();
    kill(a.pid(), Signal::SIGHUP).unwrap();
    wait_applied(&n, &a, "v3");
    eprintln!("SIGHUP → v3 committed in {:.1?}", t.elapsed());
    assert_applied(&v3, &n.root, "v3", "agent update to v3 after SIGHUP");
    assert!(agent_status(&n)["agent"]["failures"]
        .as_object()
        .unwrap()
        .is_empty());

    // SIGTERM while quiesced: the update finishes, then the agent exits 0.
    std::fs::write(n.marks.join("slow"), "").unwrap();
    write_atomic(&meta, &meta_doc("v2", &n.store));
    wait_for(Duration::from_secs(120), "the slow pre-apply hook", || {
        n.marks.join("slow-started").exists().then_some(())
    });
    kill(a.pid(), Signal::SIGTERM).unwrap();
    let code = a.wait_exit(Duration::from_secs(120));
    assert!(
        code.success(),
        "agent exit after SIGTERM: {code}\n{}",
        a.log()
    );
    assert!(
        sock.all().iter().any(|m| m.contains("STOPPING=1")),
        "{:?}",
        sock.all()
    );
    let st = agent_status(&n);
    assert_eq!(st["agent"]["state"], "stopped", "{st:#}");
    assert_applied(
        &v2,
        &n.root,
        "v2",
        "an update quiesced when SIGTERM came finishes",
    );
    std::fs::remove_file(n.marks.join("slow")).unwrap();

    // Killed mid-swap (fault point): the next start converges.
    write_atomic(&meta, &meta_doc("v3", &n.store));
    let mut a = Agent::start(&n, &sock.path, Some("after-swap"));
    let code = a.wait_exit(Duration::from_secs(300));
    assert!(
        !code.success(),
        "the fault point must kill the agent\n{}",
        a.log()
    );
    let st = agent_status(&n);
    assert_eq!(
        st["pending"], "v3",
        "the journal records the interrupted update\n{st:#}"
    );
    let a = Agent::start(&n, &sock.path, None);
    wait_applied(&n, &a, "v3");
    assert_applied(
        &v3,
        &n.root,
        "v3",
        "the restarted agent converges after a kill mid-swap",
    );
    assert_eq!(n.fs.readonly(), Some(true));
}

/// The agent's SIGTERM path before the swap: an apply whose cancel flag is
/// set stops at its safe point with the root unchanged and nothing
/// journalled as pending; the next run converges normally.
#[test]
fn a_cancelled_apply_does_not_start() {
    use std::sync::atomic::AtomicBool;
    let store = shared_store();
    let s1 = store.image("s1");
    store.image("s2");
    let s = scratch("cancel");
    let root = s.join("root");
    make_root(&s1, &root, &store.key);
    apply(&store.dir, "s1", &root, &[]).expect_ok();
    let before = snapshot_root(&root);
    let opts = imageupd::apply::ApplyOptions {
        root: root.clone(),
        from: Some(store.dir.display().to_string()),
        id: Some("s2".into()),
        cancel: Some(Arc::new(AtomicBool::new(true))),
        ..Default::default()
    };
    let err = imageupd::apply::run(&opts, &imageupd::sys::progress::Progress::new(true))
        .expect_err("a cancelled apply must stop");
    assert!(format!("{err:#}").contains("stopped on request"), "{err:#}");
    assert_unchanged(&root, &before, "after a cancelled apply");
    assert_eq!(image_id(&root).as_deref(), Some("s1"));
    let st = imageupd(["status", "--json", "--root"])
        .arg(&root)
        .ok()
        .json();
    assert!(st["pending"].is_null(), "{st:#}");
    // (The whole-tree oracle for s1 → s2 is the engine tests' business;
    // here the point is that the next run is an ordinary one.)
    let out = apply(&store.dir, "s2", &root, &[]).expect_ok();
    assert_eq!(out.json()["result"], "applied", "{}", out.describe());
    assert_eq!(image_id(&root).as_deref(), Some("s2"));
}

/// A sysctl set for a while, put back on drop (also when the test fails).
struct SysctlGuard {
    path: &'static str,
    saved: String,
}

impl SysctlGuard {
    fn set(path: &'static str, value: &str) -> SysctlGuard {
        let saved = std::fs::read_to_string(path).unwrap();
        std::fs::write(path, value).unwrap();
        SysctlGuard { path, saved }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.saved.trim());
    }
}

/// The walk report of the agent's last apply.
fn last_walk(st: &serde_json::Value) -> serde_json::Value {
    st["agent"]["last_applied"]["walk"].clone()
}

/// One change behind the agent's back, by kind, on the (read-only) root.
fn behind_its_back(n: &TestNode, kind: &str) {
    let sh = |script: &str| {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(&n.root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{kind}: {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let d = "usr/share/doc";
    n.edit(|_| match kind {
        "modify" => sh(&format!("echo '# drift' >> {d}/adduser/TODO")),
        "create" => sh(&format!("echo new > {d}/bash/drift-new; mkdir -p opt/tracked/deep; echo x > opt/tracked/deep/f")),
        "delete" => sh(&format!("rm {d}/apt/copyright")),
        "rename" => sh(&format!("mv {d}/base-files/README.FHS {d}/base-files/README.FHS.moved; mv {d}/adduser/examples {d}/adduser/examples.moved")),
        "chmod" => sh(&format!("chmod 0600 {d}/apt/changelog.gz; chmod 0700 {d}/apt/examples")),
        "chown" => sh(&format!("chown 4321:4321 {d}/bash/RBASH; chown 4321 {d}/bash")),
        "setxattr" => sh(&format!("setfattr -n user.drift -v 1 {d}/base-files/README; setfattr -n user.drift -v 2 {d}/base-files")),
        "hardlink" => sh(&format!("ln {d}/adduser/copyright {d}/apt/copyright.lnk")),
        "many" => sh("mkdir -p opt/flood; for i in $(seq 1 400); do : > opt/flood/f$i; done"),
        "control" => sh("echo unseen > opt/control-file"),
        other => panic!("unknown change {other}"),
    });
}

#[test]
fn change_tracking_never_hides_a_change() {
    let meta_dir_holder = scratch("track-meta");
    let meta = meta_dir_holder.join("metadata.json");
    let config = format!(
        "[agent]\nmetadata_file = \"{}\"\nimage_id_key = \"deploy.images.-1.id\"\nimage_source_key = \"deploy.images.-1.store\"\ndebounce_ms = 100\nrescan_secs = 3600\n",
        meta.display()
    );
    let n = TestNode::new("track", &config, true);
    let trees = [("v2", fixture_tree("v2")), ("v3", fixture_tree("v3"))];
    let sock = NotifySocket::new(n.s.path());
    let round = std::cell::Cell::new(0usize);
    // Flip the metadata to the other image; the walk report of that apply.
    let flip = |a: &Agent, what: &str| -> serde_json::Value {
        let (id, tree) = &trees[round.get() % 2];
        round.set(round.get() + 1);
        write_atomic(&meta, &meta_doc(id, &n.store));
        let st = wait_applied(&n, a, id);
        eprintln!(
            "{what}: walk {}, plan {} ms",
            last_walk(&st),
            st["agent"]["last_applied"]["phases_ms"]["plan"]
        );
        if !oracle(tree, &n.root).trim().is_empty() {
            eprintln!("--- agent log ---\n{}", clip(&a.log(), 60));
        }
        assert_applied(tree, &n.root, id, &format!("after {what}"));
        last_walk(&st)
    };
    // The image the root runs now, for the controls.
    let current = || trees[(round.get() + 1) % 2].1.clone();

    let mut a = Agent::start(&n, &sock.path, None);
    sock.wait("READY=1");
    let w = flip(&a, "the agent's start");
    assert_eq!(w["mode"], "full", "{w:#}");
    assert_eq!(w["fallback"], "first walk since the agent started", "{w:#}");
    let w = flip(&a, "no change");
    assert_eq!(w["mode"], "tracked", "{w:#}\n{}", clip(&a.log(), 40));
    let full = w["objects"].as_u64().unwrap();
    for kind in [
        "modify", "create", "delete", "rename", "chmod", "chown", "setxattr", "hardlink",
    ] {
        behind_its_back(&n, kind);
        // The change is real: the root no longer matches its image.
        let img = current();
        assert!(
            !oracle(&img, &n.root).trim().is_empty() || !meta_diff(&img, &n.root).is_empty(),
            "{kind}: the change did not show in the oracles"
        );
        let w = flip(&a, kind);
        assert_eq!(w["mode"], "tracked", "{kind}: {w:#}");
        assert!(w.get("fallback").is_none(), "{kind}: {w:#}");
        let relisted = w["relisted_dirs"].as_u64().unwrap_or(0);
        assert!(
            relisted >= 1 && relisted * 20 < full,
            "{kind}: {relisted} directories listed again of a {full}-object root: {w:#}"
        );
    }

    // While the agent is down, nothing tracks: its first walk is full.
    kill(a.pid(), Signal::SIGTERM).unwrap();
    assert!(a.wait_exit(Duration::from_secs(60)).success());
    behind_its_back(&n, "modify");
    // A low kernel queue for the next agent's fanotify group (read when
    // the group is made), restored once it runs.
    let low = SysctlGuard::set("/proc/sys/fs/fanotify/max_queued_events", "64");
    let a2 = Agent::start(&n, &sock.path, None);
    wait_for(
        Duration::from_secs(30),
        "the second agent's tracker",
        || a2.log().contains("tracking changes").then_some(()),
    );
    drop(low);
    let w = flip(&a2, "changes while the agent was down");
    assert_eq!(w["mode"], "full", "{w:#}");
    assert_eq!(w["fallback"], "first walk since the agent started", "{w:#}");

    // More events than the queue holds while the agent cannot read them.
    kill(a2.pid(), Signal::SIGSTOP).unwrap();
    behind_its_back(&n, "many");
    kill(a2.pid(), Signal::SIGCONT).unwrap();
    let w = flip(&a2, "an overflowing queue");
    assert_eq!(w["mode"], "full", "{w:#}");
    assert_eq!(
        w["fallback"], "the kernel's event queue overflowed",
        "{w:#}"
    );
    drop(a2);

    // Positive control: a tracker that drops its events plans from a stale
    // view, and the oracle catches the change it missed.
    let a3 = Agent::start_with(
        &n,
        &sock.path,
        None,
        &[("IMAGEUPD_TEST_UNSAFE_SKIP", "track-events")],
    );
    let w = flip(&a3, "the blind agent's start");
    assert_eq!(w["mode"], "full", "{w:#}");
    behind_its_back(&n, "control");
    let (id, tree) = &trees[round.get() % 2];
    write_atomic(&meta, &meta_doc(id, &n.store));
    let st = wait_applied(&n, &a3, id);
    assert_eq!(last_walk(&st)["mode"], "tracked", "{st:#}");
    let missed = oracle(tree, &n.root);
    assert!(
        missed.contains("opt/control-file"),
        "the blind tracker's plan should have missed opt/control-file; oracle: {missed}"
    );
}
