//! Tests of the hook runner, with real shell-script hooks.

use super::output::{last_lines, push_bounded};
use super::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::sync::MutexGuard;

/// Serialises the tests that write scripts or spawn processes: a script
/// still open for writing in one thread is inherited by a child forked in
/// another, and exec then fails with ETXTBSY.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

fn spawn_lock() -> MutexGuard<'static, ()> {
    SPAWN_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn order(list: &[&str]) -> Vec<String> {
    order_hook_names(names(list)).0
}

#[test]
fn numeric_prefix_orders_numerically() {
    assert_eq!(order(&["10-b", "2-a", "1-c"]), ["1-c", "2-a", "10-b"]);
}

#[test]
fn equal_numbers_tie_break_bytewise() {
    assert_eq!(order(&["10", "010", "10-a"]), ["010", "10", "10-a"]);
    assert_eq!(order(&["5-b", "5-a", "05-c"]), ["05-c", "5-a", "5-b"]);
    // C locale: uppercase before lowercase, '-' before digits.
    assert_eq!(order(&["1b", "1B", "1-", "1_"]), ["1-", "1B", "1_", "1b"]);
}

#[test]
fn names_without_digits_count_as_zero() {
    assert_eq!(
        order(&["1-x", "zeta", "alpha", "0-first", "00"]),
        ["0-first", "00", "alpha", "zeta", "1-x"]
    );
}

#[test]
fn leading_minus_is_a_negative_number_as_in_sort_n() {
    assert_eq!(
        order(&["1-a", "-5-x", "-10-y", "a", "-0", "-"]),
        ["-10-y", "-5-x", "-", "-0", "a", "1-a"]
    );
}

#[test]
fn huge_numbers_do_not_overflow() {
    assert_eq!(
        order(&["99999999999999999999999-a", "100000000000000000000000", "9"]),
        ["9", "99999999999999999999999-a", "100000000000000000000000"]
    );
}

#[test]
fn bad_names_are_skipped_with_reason() {
    let (run, skipped) = order_hook_names(names(&[
        "10-foo.sh",
        "20-ok",
        ".hidden",
        "30-bak~",
        "README.md",
        "40 space",
        "",
        "50_ok-too",
    ]));
    assert_eq!(run, ["20-ok", "50_ok-too"]);
    let skipped_names: Vec<_> = skipped.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        skipped_names,
        [
            "",
            ".hidden",
            "10-foo.sh",
            "30-bak~",
            "40 space",
            "README.md"
        ]
    );
    assert!(skipped.iter().all(|(_, why)| *why == SKIP_BAD_NAME));
}

#[test]
fn non_ascii_names_are_skipped() {
    let (run, skipped) = order_hook_names(names(&["10-é", "10-e"]));
    assert_eq!(run, ["10-e"]);
    assert_eq!(skipped, [("10-é".to_string(), SKIP_BAD_NAME)]);
}

#[test]
fn ordering_matches_real_sort_n_in_c_locale() {
    let corpus = [
        "10-b",
        "2-a",
        "010",
        "10",
        "1",
        "01",
        "001-x",
        "zeta",
        "Alpha",
        "alpha",
        "_x",
        "-x",
        "-1",
        "-01",
        "-10-z",
        "-",
        "-0",
        "0",
        "00",
        "9z",
        "9Z",
        "9-",
        "9_",
        "10a",
        "10A",
        "123456789012345678901234567890",
        "99",
        "1000",
        "a10",
        "a2",
    ];
    let _guard = spawn_lock();
    let mut child = Command::new("sort")
        .arg("-n")
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sort(1) is available");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for name in corpus {
            writeln!(stdin, "{name}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let expected: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(order(&corpus), expected);
}

#[test]
fn last_lines_keeps_the_end() {
    assert_eq!(last_lines(b"a\nb\nc\n\n", 2, 100), "b\nc");
    assert_eq!(last_lines(b"only", 5, 100), "only");
    assert_eq!(last_lines(b"", 5, 100), "");
    assert_eq!(last_lines("xxé".as_bytes(), 1, 2), "é");
    assert_eq!(last_lines("xxxé".as_bytes(), 1, 3), "xé");
}

#[test]
fn push_bounded_keeps_last_bytes() {
    let mut buf = b"abc".to_vec();
    push_bounded(&mut buf, b"defg", 5);
    assert_eq!(buf, b"cdefg");
}

#[test]
fn env_vars_are_rendered() {
    let env = HookEnv {
        root: "/r".into(),
        from: None,
        to: "img-2".into(),
        plan_path: "/r/plan.json".into(),
        kernel_changed: true,
    };
    let vars = env.vars();
    assert_eq!(
        vars,
        [
            ("IMAGEUPD_ROOT", "/r".into()),
            ("IMAGEUPD_FROM", "".into()),
            ("IMAGEUPD_TO", "img-2".into()),
            ("IMAGEUPD_PLAN", "/r/plan.json".into()),
            ("IMAGEUPD_KERNEL_CHANGED", "1".into()),
        ]
    );
}

#[test]
fn phase_names() {
    let dirs: Vec<_> = HookPhase::ALL.iter().map(|p| p.dir_name()).collect();
    assert_eq!(
        dirs,
        ["pre-apply.d", "post-apply.d", "abort.d", "pre-reboot.d"]
    );
    for p in HookPhase::ALL {
        assert_eq!(p.dir_name(), format!("{p}.d"));
    }
}

#[test]
fn describe_exit_names_signals() {
    assert_eq!(describe_exit(Some(3), None), "exited with status 3");
    assert_eq!(
        describe_exit(None, Some(9)),
        "was killed by signal SIGKILL (9)"
    );
}

// ---- real hooks in temporary directories ----

struct Fixture {
    tmp: tempfile::TempDir,
    runner: HookRunner,
}

impl Fixture {
    fn new(timeout: Duration) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let runner = HookRunner::for_root(tmp.path(), timeout);
        Fixture { tmp, runner }
    }

    fn dir(&self, phase: HookPhase) -> PathBuf {
        let dir = self.runner.phase_dir(phase);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Writes an executable `#!/bin/sh` hook.
    fn hook(&self, phase: HookPhase, name: &str, body: &str) -> PathBuf {
        let path = self.dir(phase).join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn out(&self) -> PathBuf {
        self.tmp.path().join("out")
    }

    fn env(&self) -> HookEnv {
        HookEnv {
            root: self.tmp.path().to_owned(),
            from: Some("img-1".into()),
            to: "img-2".into(),
            plan_path: self.tmp.path().join("plan.json"),
            kernel_changed: false,
        }
    }

    fn read_out(&self) -> String {
        fs::read_to_string(self.out()).unwrap_or_default()
    }
}

const SECOND: Duration = Duration::from_secs(1);
const LONG: Duration = Duration::from_secs(30);

#[test]
fn missing_directory_means_no_hooks() {
    let fx = Fixture::new(LONG);
    let outcomes = fx.runner.run(HookPhase::PreApply, &fx.env()).unwrap();
    assert!(outcomes.is_empty());
}

#[test]
fn hooks_run_in_sort_n_order() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    let out = fx.out();
    for name in ["10-b", "2-a", "010", "zeta", "1"] {
        fx.hook(
            HookPhase::PostApply,
            name,
            &format!("echo {name} >> '{}'", out.display()),
        );
    }
    let outcomes = fx.runner.run(HookPhase::PostApply, &fx.env()).unwrap();
    let ran: Vec<_> = outcomes.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(ran, ["zeta", "1", "2-a", "010", "10-b"]);
    assert_eq!(fx.read_out(), "zeta\n1\n2-a\n010\n10-b\n");
    assert!(outcomes.iter().all(|o| o.status_code == 0));
}

#[test]
fn environment_is_passed() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    fx.hook(
        HookPhase::PreApply,
        "10-env",
        &format!(
            "env | grep -E '^IMAGEUPD_(ROOT|FROM|TO|PLAN|KERNEL_CHANGED)=' | sort > '{}'",
            fx.out().display()
        ),
    );
    let mut env = fx.env();
    env.kernel_changed = true;
    fx.runner.run(HookPhase::PreApply, &env).unwrap();
    let got = fx.read_out();
    let root = fx.tmp.path().display();
    assert_eq!(
        got,
        format!(
            "IMAGEUPD_FROM=img-1\nIMAGEUPD_KERNEL_CHANGED=1\nIMAGEUPD_PLAN={root}/plan.json\nIMAGEUPD_ROOT={root}\nIMAGEUPD_TO=img-2\n"
        )
    );
}

#[test]
fn parent_environment_is_inherited_and_from_may_be_empty() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    fx.hook(
        HookPhase::PreApply,
        "10-env",
        &format!(
            "printf 'from=[%s] path_set=%s\\n' \"$IMAGEUPD_FROM\" \"${{PATH:+yes}}\" > '{}'",
            fx.out().display()
        ),
    );
    let mut env = fx.env();
    env.from = None;
    fx.runner.run(HookPhase::PreApply, &env).unwrap();
    assert_eq!(fx.read_out(), "from=[] path_set=yes\n");
}

#[test]
fn skipping_rules() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    let out = fx.out();
    let body = |tag: &str| format!("echo {tag} >> '{}'", out.display());
    fx.hook(HookPhase::PreApply, "10-ok", &body("ok"));
    fx.hook(HookPhase::PreApply, "20-foo.sh", &body("dotted"));
    fx.hook(HookPhase::PreApply, "30-bak~", &body("backup"));
    let noexec = fx.hook(HookPhase::PreApply, "40-noexec", &body("noexec"));
    fs::set_permissions(&noexec, fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(fx.dir(HookPhase::PreApply).join("50-subdir")).unwrap();
    let target = fx.hook(HookPhase::Abort, "60-linked", &body("linked"));
    std::os::unix::fs::symlink(&target, fx.dir(HookPhase::PreApply).join("60-linked")).unwrap();
    std::os::unix::fs::symlink(
        "/nonexistent/imageupd-test",
        fx.dir(HookPhase::PreApply).join("70-dangling"),
    )
    .unwrap();

    let selected = fx.runner.select(HookPhase::PreApply).unwrap();
    let dir = fx.runner.phase_dir(HookPhase::PreApply);
    assert_eq!(selected, [dir.join("10-ok"), dir.join("60-linked")]);

    let outcomes = fx.runner.run(HookPhase::PreApply, &fx.env()).unwrap();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(fx.read_out(), "ok\nlinked\n");
}

#[test]
fn failure_stops_later_hooks_and_reports_stderr() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    let out = fx.out();
    fx.hook(
        HookPhase::PreApply,
        "10-first",
        &format!("echo first >> '{}'", out.display()),
    );
    let bad = fx.hook(
        HookPhase::PreApply,
        "20-stop-nova",
        "echo progress\necho 'Failed to stop nova-compute.service: Unit not loaded.' >&2\nexit 3",
    );
    fx.hook(
        HookPhase::PreApply,
        "30-later",
        &format!("echo later >> '{}'", out.display()),
    );

    let err = fx.runner.run(HookPhase::PreApply, &fx.env()).unwrap_err();
    match &err {
        HookError::Failed {
            phase,
            hook,
            code,
            signal,
            stderr_tail,
        } => {
            assert_eq!(*phase, HookPhase::PreApply);
            assert_eq!(hook, &bad);
            assert_eq!(*code, Some(3));
            assert_eq!(*signal, None);
            assert_eq!(
                stderr_tail,
                "Failed to stop nova-compute.service: Unit not loaded."
            );
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(fx.read_out(), "first\n");
    let msg = err.to_string();
    assert!(msg.contains("pre-apply.d/20-stop-nova"), "{msg}");
    assert!(msg.contains("exited with status 3"), "{msg}");
    assert!(msg.contains("Unit not loaded."), "{msg}");
    assert!(msg.contains("later pre-apply hooks were not run"), "{msg}");
}

#[test]
fn stderr_tail_is_bounded() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    fx.hook(
        HookPhase::PostApply,
        "10-noisy",
        "i=0; while [ $i -lt 5000 ]; do echo \"line $i\" >&2; i=$((i+1)); done; exit 1",
    );
    let err = fx.runner.run(HookPhase::PostApply, &fx.env()).unwrap_err();
    let HookError::Failed { stderr_tail, .. } = err else {
        panic!("expected Failed");
    };
    let lines: Vec<_> = stderr_tail.lines().collect();
    assert_eq!(lines.len(), STDERR_TAIL_LINES);
    assert_eq!(lines.last(), Some(&"line 4999"));
}

#[test]
fn killed_by_signal_is_reported() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    fx.hook(HookPhase::Abort, "10-suicide", "kill -TERM $$");
    let err = fx.runner.run(HookPhase::Abort, &fx.env()).unwrap_err();
    assert!(matches!(
        err,
        HookError::Failed {
            code: None,
            signal: Some(15),
            ..
        }
    ));
    let msg = err.to_string();
    assert!(msg.contains("killed by signal SIGTERM"), "{msg}");
    assert!(msg.contains("wrote nothing to stderr"), "{msg}");
}

#[test]
fn unrunnable_hook_is_an_io_error() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    let path = fx.dir(HookPhase::PreReboot).join("10-garbage");
    fs::write(&path, "no shebang, not an ELF\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    let err = fx.runner.run(HookPhase::PreReboot, &fx.env()).unwrap_err();
    assert!(matches!(err, HookError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("pre-reboot.d/10-garbage"), "{err}");
}

fn is_alive(pid: i32) -> bool {
    // A zombie reparented to a non-reaping init counts as dead.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        }
        Err(_) => false,
    }
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let _guard = spawn_lock();
    let fx = Fixture::new(SECOND);
    let pids = fx.tmp.path().join("pids");
    let out = fx.out();
    fx.hook(
        HookPhase::PreApply,
        "10-hang",
        &format!(
            "echo about to hang >&2\nsleep 30 &\necho $$ $! > '{}'\nsleep 30",
            pids.display()
        ),
    );
    fx.hook(
        HookPhase::PreApply,
        "20-later",
        &format!("echo later >> '{}'", out.display()),
    );

    let start = Instant::now();
    let err = fx.runner.run(HookPhase::PreApply, &fx.env()).unwrap_err();
    let elapsed = start.elapsed();
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(elapsed >= SECOND, "took {elapsed:?}");

    match &err {
        HookError::TimedOut {
            phase,
            timeout,
            stderr_tail,
            ..
        } => {
            assert_eq!(*phase, HookPhase::PreApply);
            assert_eq!(*timeout, SECOND);
            assert_eq!(stderr_tail, "about to hang");
        }
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("pre-apply.d/10-hang"), "{msg}");
    assert!(msg.contains("within 1s"), "{msg}");
    assert_eq!(fx.read_out(), "", "later hooks must not run");

    let pids: Vec<i32> = fs::read_to_string(&pids)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    // SIGKILL delivery is immediate, but give the kernel a moment to
    // finish tearing the processes down.
    let gone_by = Instant::now() + SECOND;
    while pids.iter().any(|&p| is_alive(p)) && Instant::now() < gone_by {
        thread::sleep(Duration::from_millis(10));
    }
    for pid in pids {
        assert!(!is_alive(pid), "process {pid} survived the timeout");
    }
}

#[test]
fn lingering_background_output_does_not_block() {
    let _guard = spawn_lock();
    let fx = Fixture::new(LONG);
    let pids = fx.tmp.path().join("pids");
    // The background sleep inherits stdout, so the pipe stays open after
    // the hook exits.
    fx.hook(
        HookPhase::PostApply,
        "10-daemonise-badly",
        &format!("sleep 5 &\necho $! > '{}'", pids.display()),
    );
    let start = Instant::now();
    let outcomes = fx.runner.run(HookPhase::PostApply, &fx.env()).unwrap();
    assert_eq!(outcomes.len(), 1);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    let pid: i32 = fs::read_to_string(&pids).unwrap().trim().parse().unwrap();
    // Not ours to kill on success; clean up after the test.
    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
}
