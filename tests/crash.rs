//! Crash safety: an apply v1 -> v2 killed at random moments (SIGKILL) and at
//! every deterministic fault point (IMAGEUPD_FAULT=<name>, SIGABRT) must
//! leave every path wholly old or wholly new, nothing foreign outside the
//! preserve list and the state area, and the next apply must converge.
//!
//! The root is reset to v1 between iterations with rsync, never with
//! imageupd. Tunables: IMAGEUPD_CRASH_ITERATIONS (default 50),
//! IMAGEUPD_CRASH_SEED (default fixed, so a run replays the same kill
//! schedule as far as timing allows).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// What v1 and v2 have at each path (kind with content identity only).
struct Versions {
    v1: Tree,
    v2: Tree,
}

impl Versions {
    fn load(v1: &Path, v2: &Path) -> Versions {
        Versions { v1: scan(v1, &|r| is_preserved(r)), v2: scan(v2, &|r| is_preserved(r)) }
    }
}

/// The crash oracle: every path outside the preserve list / state area is
/// v1's or v2's version of that path (type, content digest, symlink
/// target, device number); paths present in both versions still exist.
fn crash_violations(root: &Path, ver: &Versions) -> Vec<String> {
    let now = scan(root, &|r| is_preserved(r));
    let mut bad = Vec::new();
    for (p, n) in &now {
        let old = ver.v1.get(p).map(|x| &x.kind);
        let new = ver.v2.get(p).map(|x| &x.kind);
        if old.is_none() && new.is_none() {
            bad.push(format!("{}: exists but is in neither v1 nor v2 ({:?})", show(p), n.kind));
        } else if old != Some(&n.kind) && new != Some(&n.kind) {
            bad.push(format!("{}: is neither v1's nor v2's version: {:?} (v1 {:?}, v2 {:?})", show(p), n.kind, old, new));
        }
    }
    for p in ver.v1.keys().filter(|p| ver.v2.contains_key(*p)) {
        if !now.contains_key(p) {
            bad.push(format!("{}: missing, but both v1 and v2 have it", show(p)));
        }
    }
    bad
}

/// Differences between ROOT and the image scan (metadata oracle with a
/// pre-scanned image).
fn converge_diff(image: &Tree, root: &Path) -> Vec<String> {
    diff_trees(image, &scan(root, &|r| is_preserved(r)), "image", "root")
}

struct Bench {
    pristine: std::path::PathBuf,
    pristine_scan: Tree,
    root: std::path::PathBuf,
    v2: std::path::PathBuf,
    ver: Versions,
    store: std::path::PathBuf,
    logs: std::path::PathBuf,
}

impl Bench {
    fn new(s: &Scratch) -> Bench {
        let store = shared_store();
        let v1 = store.image("v1");
        let v2 = store.image("v2");
        let pristine = s.join("pristine");
        make_root(&v1, &pristine, &store.key);
        let pristine_scan = snapshot_root(&pristine);
        let root = s.join("root");
        reset_tree(&pristine, &root);
        let logs = s.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        Bench { pristine, pristine_scan, root, ver: Versions::load(&v1, &v2), v2, store: store.dir.clone(), logs }
    }

    /// Back to pristine v1 with rsync (never imageupd), and prove it. Should
    /// rsync's quick check leave a difference, start over with a full copy.
    fn reset(&self) {
        reset_tree(&self.pristine, &self.root);
        let d = diff_trees(&self.pristine_scan, &snapshot_root(&self.root), "pristine", "reset root");
        if !d.is_empty() {
            eprintln!("crash: rsync reset left {} differences ({}); copying afresh", d.len(), d[0]);
            std::fs::remove_dir_all(&self.root).expect("remove root");
            copy_tree(&self.pristine, &self.root);
            let d = diff_trees(&self.pristine_scan, &snapshot_root(&self.root), "pristine", "copied root");
            assert!(d.is_empty(), "cannot restore v1 exactly:\n{}", clip(&d.join("\n"), 40));
        }
    }

    fn apply_cmd(&self) -> Run {
        imageupd(["apply", "--from"]).arg(&self.store).args(["--id", "v2", "--root"]).arg(&self.root).arg("--json")
    }

    /// After an interruption: check the crash oracle, then re-apply and
    /// check convergence. `full` adds the rsync oracle.
    #[track_caller]
    fn check_and_converge(&self, what: &str, full: bool) {
        let bad = crash_violations(&self.root, &self.ver);
        assert!(bad.is_empty(), "{what}: the interrupted apply left torn state:\n{}", clip(&bad.join("\n"), 60));
        let out = self.apply_cmd().run();
        assert_eq!(out.code(), Some(EXIT_OK), "{what}: apply after the interruption failed\n{}", out.describe());
        let result = out.json()["result"].as_str().unwrap_or_default().to_string();
        assert!(
            result == "applied" || result == "nothing-to-do",
            "{what}: unexpected result {result:?} after the interruption\n{}",
            out.describe()
        );
        let d = converge_diff(&self.ver.v2, &self.root);
        assert!(d.is_empty(), "{what}: the re-run apply did not converge to v2:\n{}", clip(&d.join("\n"), 60));
        if full {
            let r = oracle(&self.v2, &self.root);
            assert!(r.trim().is_empty(), "{what}: rsync oracle after convergence:\n{}", clip(&r, 60));
        }
        assert_eq!(image_id(&self.root).as_deref(), Some("v2"), "{what}: /etc/image_id after convergence");
        let v = verify(&self.root, true);
        assert_eq!(v.code(), Some(EXIT_OK), "{what}: verify --checksum after convergence\n{}", v.describe());
    }
}

#[test]
fn random_sigkill_during_apply_converges() {
    let t0 = Instant::now();
    let iterations: usize = std::env::var("IMAGEUPD_CRASH_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(50);
    let seed: u64 = std::env::var("IMAGEUPD_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x1de_a5ed);
    let s = scratch("crash-kill");
    let b = Bench::new(&s);

    // One uninterrupted apply to measure the window and to check the baseline.
    let out = b.apply_cmd().ok();
    assert_eq!(out.json()["result"].as_str(), Some("applied"), "{}", out.describe());
    assert_applied(&b.v2, &b.root, "v2", "uninterrupted apply v1 -> v2");
    let full = out.elapsed;
    eprintln!("crash: full apply takes {full:.2?}; {iterations} kill points, seed {seed}");

    let mut rng = Rng::new(seed);
    let mut finished_before_kill = 0;
    for i in 0..iterations {
        b.reset();
        // sqrt biases towards the later part of the run, where staging and
        // the swap happen; the early part (plan, fetch) still gets samples.
        let frac = rng.unit().sqrt();
        let delay = full.mul_f64(frac);
        let log = b.logs.join("apply.log");
        let (mut c, desc) = b.apply_cmd().into_command();
        let logf = std::fs::File::create(&log).unwrap();
        c.stdin(Stdio::null()).stdout(logf.try_clone().unwrap()).stderr(logf);
        let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let killed = status.code().is_none();
        if !killed {
            finished_before_kill += 1;
            assert_eq!(
                status.code(),
                Some(EXIT_OK),
                "iteration {i}: apply exited by itself with a failure:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        let what = format!("kill iteration {i} at {delay:.2?} ({:.0}% of a full apply, killed={killed})", frac * 100.0);
        b.check_and_converge(&what, i % 10 == 9);
    }
    eprintln!(
        "crash: {iterations} kill iterations done in {:.1?} ({finished_before_kill} finished before the kill)",
        t0.elapsed()
    );
    assert!(
        finished_before_kill < iterations,
        "every apply finished before it could be killed; the kill points tested nothing"
    );
}

#[test]
fn every_fault_point_converges() {
    let t0 = Instant::now();
    let points = imageupd(["fault-points"]).ok().stdout;
    let points: Vec<String> = points.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    assert!(!points.is_empty(), "imageupd fault-points listed no fault points");
    let s = scratch("crash-fault");
    let b = Bench::new(&s);
    let mut not_reached = Vec::new();
    let mut outcomes: BTreeMap<String, String> = BTreeMap::new();
    for (i, fp) in points.iter().enumerate() {
        b.reset();
        let out = b.apply_cmd().env("IMAGEUPD_FAULT", fp).timeout(Duration::from_secs(300)).run();
        match out.signal() {
            Some(6) => {
                outcomes.insert(fp.clone(), "SIGABRT".into());
            }
            _ => {
                // Not reached on this path (or the fault did not abort).
                outcomes.insert(fp.clone(), format!("{:?}", out.code()));
                not_reached.push(format!("{fp}: {}", out.describe()));
            }
        }
        b.check_and_converge(&format!("fault point {fp}"), i % 5 == 4 || i + 1 == points.len());
    }
    eprintln!("crash: {} fault points in {:.1?}: {outcomes:?}", points.len(), t0.elapsed());
    assert!(
        not_reached.is_empty(),
        "{} of {} fault points did not abort an apply v1 -> v2 (IMAGEUPD_FAULT=<name> must SIGABRT at the point):\n{}",
        not_reached.len(),
        points.len(),
        not_reached.join("\n")
    );
}
