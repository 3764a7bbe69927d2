//! Operator hooks around an apply (synthetic s1 -> s2): which run, in which
//! order (`sort -n`, like dib-run-parts), with which environment; what a
//! failure in each phase does; timeouts; and the apply lock.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

struct Node {
    _s: Scratch,
    root: PathBuf,
    marks: PathBuf,
}

impl Node {
    /// A root installed at s1 (adopted by an apply), plus a directory
    /// outside it where hooks leave their marks.
    fn new(name: &str) -> Node {
        let store = shared_store();
        store.image("s2");
        let s = scratch(name);
        let root = s.join("root");
        install_root(store, "s1", &root);
        let marks = s.join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        Node { _s: s, root, marks }
    }

    fn hook(&self, phase: &str, name: &str, body: &str) -> PathBuf {
        let p = self
            .root
            .join("etc/imageupd/hooks")
            .join(format!("{phase}.d"))
            .join(name);
        write_script(&p, body);
        p
    }

    /// A hook that logs its phase, name and environment to marks/log.
    fn logging_hook(&self, phase: &str, name: &str) {
        let m = self.marks.display();
        self.hook(
            phase,
            name,
            &format!(
                r#"echo "{phase} {name} root=$IMAGEUPD_ROOT from=$IMAGEUPD_FROM to=$IMAGEUPD_TO kernel_changed=$IMAGEUPD_KERNEL_CHANGED image_id=$(cat "$IMAGEUPD_ROOT/etc/image_id")" >> {m}/log
if [ -f "$IMAGEUPD_PLAN" ]; then cp "$IMAGEUPD_PLAN" {m}/plan-{phase}-{name}.json; fi"#
            ),
        );
    }

    fn log(&self) -> Vec<String> {
        std::fs::read_to_string(self.marks.join("log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    fn apply(&self) -> Out {
        apply(&shared_store().dir, "s2", &self.root, &[])
    }
}

/// The order `sort -n` (C locale) gives NAMES.
fn sort_n(names: &[&str]) -> Vec<String> {
    let input = names.join("\n");
    let out = sh(&format!(
        "printf '%s\\n' '{}' | LC_ALL=C sort -n",
        input.replace('\'', "'\\''")
    ));
    out.lines().map(String::from).collect()
}

#[test]
fn hooks_run_in_sort_n_order_with_the_documented_environment() {
    let n = Node::new("hooks-order");
    let runnable = [
        "10-tenth",
        "9-ninth",
        "1-first",
        "02-second",
        "100-last",
        "a_alpha",
        "B-beta",
    ];
    for phase in ["pre-apply", "post-apply", "abort"] {
        for name in runnable {
            n.logging_hook(phase, name);
        }
        // Skipped: dots in the name, not executable, a directory.
        n.logging_hook(phase, "50-skip.sh");
        n.logging_hook(phase, "60.bak");
        let noexec = n.hook(
            phase,
            "70-noexec",
            &format!("echo {phase} 70-noexec >> {}/log", n.marks.display()),
        );
        std::fs::set_permissions(&noexec, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        std::fs::create_dir_all(
            n.root
                .join("etc/imageupd/hooks")
                .join(format!("{phase}.d/80-dir")),
        )
        .unwrap();
    }
    let out = n.apply().expect_ok();
    assert_eq!(out.json()["result"], "applied", "{}", out.describe());
    assert_committed_s2(&n.root, "apply with hooks");

    let root = n.root.display().to_string();
    let mut expected = Vec::new();
    for (phase, id) in [("pre-apply", "s1"), ("post-apply", "s2")] {
        for name in sort_n(&runnable) {
            expected.push(format!(
                "{phase} {name} root={root} from=s1 to=s2 kernel_changed=0 image_id={id}"
            ));
        }
    }
    assert_eq!(
        n.log(),
        expected,
        "hooks that ran, in order (abort hooks must not run on success)\n{}",
        out.describe()
    );
    for phase in ["pre-apply", "post-apply"] {
        let p = n.marks.join(format!("plan-{phase}-1-first.json"));
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("IMAGEUPD_PLAN was not a readable file in {phase}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("IMAGEUPD_PLAN is not JSON ({e}): {text}"));
        assert!(v.is_object(), "IMAGEUPD_PLAN is not a JSON object: {text}");
    }
}

#[test]
fn failing_pre_apply_hook_runs_abort_hooks_in_order() {
    let n = Node::new("hooks-prefail");
    let m = n.marks.display().to_string();
    n.hook("pre-apply", "1-ok", &format!("echo pre 1-ok >> {m}/log"));
    n.hook(
        "pre-apply",
        "5-fail",
        &format!("echo pre 5-fail >> {m}/log; exit 1"),
    );
    n.hook(
        "pre-apply",
        "7-never",
        &format!("echo pre 7-never >> {m}/log"),
    );
    n.hook(
        "abort",
        "20-b",
        &format!("echo abort 20-b to=$IMAGEUPD_TO >> {m}/log"),
    );
    n.hook(
        "abort",
        "3-a",
        &format!("echo abort 3-a to=$IMAGEUPD_TO >> {m}/log"),
    );
    n.hook(
        "post-apply",
        "1-never",
        &format!("echo post 1-never >> {m}/log"),
    );
    let before = snapshot_root(&n.root);
    let out = n.apply();
    assert_eq!(out.code(), Some(EXIT_PRE_HOOK), "{}", out.describe());
    assert_eq!(
        n.log(),
        [
            "pre 1-ok",
            "pre 5-fail",
            "abort 3-a to=s2",
            "abort 20-b to=s2"
        ],
        "{}",
        out.describe()
    );
    assert_unchanged(&n.root, &before, "failing pre-apply hook");
    assert_converged(&fixture_tree("s1"), &n.root, "failing pre-apply hook");
    assert_eq!(image_id(&n.root).as_deref(), Some("s1"));
}

#[test]
fn failing_post_apply_hook_is_exit_7_with_the_update_committed() {
    let n = Node::new("hooks-postfail");
    let m = n.marks.display().to_string();
    n.hook(
        "post-apply",
        "10-fail",
        &format!("echo post 10-fail >> {m}/log; exit 2"),
    );
    n.hook("abort", "10-abort", &format!("echo abort >> {m}/log"));
    let out = n.apply();
    assert_eq!(out.code(), Some(EXIT_POST_HOOK), "{}", out.describe());
    assert_committed_s2(&n.root, "failing post-apply hook (update committed)");
    assert_eq!(
        n.log().first().map(String::as_str),
        Some("post 10-fail"),
        "{}",
        out.describe()
    );
    // The failure is reported.
    let st = imageupd(["status", "--root"])
        .arg(&n.root)
        .arg("--json")
        .ok();
    let text = st.stdout.to_lowercase();
    assert!(
        text.contains("post-apply") || text.contains("hook"),
        "status does not report the hook failure\n{}",
        st.describe()
    );
}

/// Whether a process exists (and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn read_pid(p: &Path) -> u32 {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .parse()
        .expect("pid")
}

#[test]
fn hook_exceeding_timeout_is_killed_and_fails() {
    let n = Node::new("hooks-timeout");
    write_config(&n.root, "hook_timeout_secs = 2\n");
    let m = n.marks.display().to_string();
    n.hook(
        "pre-apply",
        "10-hang",
        &format!("echo $$ > {m}/pid; exec sleep 60"),
    );
    n.hook("abort", "10-abort", &format!("echo abort >> {m}/log"));
    let before = snapshot_root(&n.root);
    let t = Instant::now();
    let out = n.apply();
    let took = t.elapsed();
    assert_eq!(
        out.code(),
        Some(EXIT_PRE_HOOK),
        "a hook past its timeout must count as failed\n{}",
        out.describe()
    );
    assert!(
        took < Duration::from_secs(20),
        "the hook was not stopped at its 2 s timeout (apply took {took:.1?})"
    );
    let pid = read_pid(&n.marks.join("pid"));
    assert!(
        !alive(pid),
        "the timed-out hook (pid {pid}) is still running"
    );
    assert_eq!(
        n.log(),
        ["abort"],
        "abort hooks after the timed-out pre-apply hook"
    );
    assert_unchanged(&n.root, &before, "timed-out pre-apply hook");
    assert_eq!(image_id(&n.root).as_deref(), Some("s1"));
}

#[test]
fn hook_timeout_kills_the_hooks_children_too() {
    let n = Node::new("hooks-timeout-tree");
    write_config(&n.root, "hook_timeout_secs = 2\n");
    let m = n.marks.display().to_string();
    // A hook whose child outlives the shell, holding stdout open.
    n.hook(
        "post-apply",
        "10-hang",
        &format!("sleep 60 &\necho $! > {m}/pid\nwait"),
    );
    let t = Instant::now();
    let out = n.apply();
    let took = t.elapsed();
    assert_eq!(out.code(), Some(EXIT_POST_HOOK), "{}", out.describe());
    assert!(
        took < Duration::from_secs(20),
        "apply waited for the hook's child (took {took:.1?})"
    );
    let pid = read_pid(&n.marks.join("pid"));
    let gone = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !alive(pid)
    });
    if !gone {
        let _ = std::process::Command::new("kill")
            .arg("-9")
            .arg(pid.to_string())
            .status();
    }
    assert!(
        gone,
        "the timed-out hook's child process (pid {pid}) was left running"
    );
    assert_committed_s2(&n.root, "post-apply hook timeout (committed)");
}

#[test]
fn concurrent_apply_is_refused_by_the_lock() {
    let n = Node::new("hooks-lock");
    let m = n.marks.display().to_string();
    // The first apply holds the lock while its pre-apply hook waits for us.
    n.hook(
        "pre-apply",
        "10-wait",
        &format!("touch {m}/started\nwhile [ ! -e {m}/go ]; do sleep 0.1; done"),
    );
    let store = &shared_store().dir;
    let (mut c, desc) = imageupd(["apply", "--from"])
        .arg(store)
        .args(["--id", "s2", "--root"])
        .arg(&n.root)
        .arg("--json")
        .into_command();
    let log = n.marks.join("first.log");
    let f = std::fs::File::create(&log).unwrap();
    c.stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    let mut first = c.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let t = Instant::now();
    while !n.marks.join("started").exists() {
        if let Some(st) = first.try_wait().unwrap() {
            panic!(
                "first apply ended ({st}) before its hook ran:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "first apply never reached its pre-apply hook"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = imageupd(["apply", "--from"])
        .arg(store)
        .args(["--id", "s2", "--root"])
        .arg(&n.root)
        .arg("--json")
        .timeout(Duration::from_secs(60))
        .run();
    std::fs::write(n.marks.join("go"), "").unwrap();
    let status = first.wait().unwrap();
    assert_eq!(
        second.code(),
        Some(EXIT_LOCKED),
        "a second apply while one runs must exit 8\n{}",
        second.describe()
    );
    assert!(
        status.success(),
        "first apply: {status}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_committed_s2(&n.root, "apply that held the lock");
}
