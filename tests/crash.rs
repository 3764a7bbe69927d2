//! Crash safety: an apply v1 -> v2 killed at random moments (SIGKILL), and
//! an apply stopped at every deterministic fault point (IMAGEUPD_FAULT=<name>,
//! SIGABRT; points that v1 -> v2 does not reach are tried on v2 -> v1), must
//! leave every path wholly old or wholly new and nothing foreign outside the
//! preserve list and the state area; the next apply must converge.
//!
//! The root is reset between iterations with rsync, never with imageupd.
//! Tunables: IMAGEUPD_CRASH_ITERATIONS (default 50), IMAGEUPD_CRASH_SEED
//! (default fixed, so a run replays the same kill schedule as far as timing
//! allows). Every fifth kill iteration also kills the recovering apply.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// What the old and the new image have at each path (kind with content
/// identity only).
struct Versions {
    old: Tree,
    new: Tree,
}

/// The crash oracle: every path outside the preserve list / state area is
/// the old or the new image's version of that path (type, content digest,
/// symlink target, device number); paths present in both still exist.
fn crash_violations(root: &Path, ver: &Versions) -> Vec<String> {
    let now = scan(root, &|r| is_preserved(r));
    let mut bad = Vec::new();
    for (p, n) in &now {
        let old = ver.old.get(p).map(|x| &x.kind);
        let new = ver.new.get(p).map(|x| &x.kind);
        if old.is_none() && new.is_none() {
            bad.push(format!(
                "{}: exists but is in neither image ({:?})",
                show(p),
                n.kind
            ));
        } else if old != Some(&n.kind) && new != Some(&n.kind) {
            bad.push(format!(
                "{}: is neither version: {:?} (old {:?}, new {:?})",
                show(p),
                n.kind,
                old,
                new
            ));
        }
    }
    for p in ver.old.keys().filter(|p| ver.new.contains_key(*p)) {
        if !now.contains_key(p) {
            bad.push(format!("{}: missing, but both images have it", show(p)));
        }
    }
    bad
}

/// Differences between ROOT and the image scan (metadata oracle with a
/// pre-scanned image).
fn converge_diff(image: &Tree, root: &Path) -> Vec<String> {
    diff_trees(image, &scan(root, &|r| is_preserved(r)), "image", "root")
}

/// A root that is reset to image FROM (a copy that trusts the store's key)
/// before every interrupted apply towards image TO.
struct Bench {
    from: &'static str,
    to: &'static str,
    pristine: PathBuf,
    pristine_scan: Tree,
    pristine_meta: Tree,
    root: PathBuf,
    to_tree: PathBuf,
    ver: Versions,
    store: PathBuf,
    logs: PathBuf,
}

impl Bench {
    fn new(s: &Scratch, from: &'static str, to: &'static str) -> Bench {
        let store = shared_store();
        let from_tree = store.image(from);
        let to_tree = store.image(to);
        let dir = s.join(format!("{from}-{to}"));
        std::fs::create_dir_all(&dir).unwrap();
        let pristine = dir.join("pristine");
        make_root(&from_tree, &pristine, &store.key);
        let pristine_scan = snapshot_root(&pristine);
        let pristine_meta = scan_opts(&pristine, &|r| is_state(r), false);
        let root = dir.join("root");
        reset_tree(&pristine, &root);
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let ver = Versions {
            old: scan(&from_tree, &|r| is_preserved(r)),
            new: scan(&to_tree, &|r| is_preserved(r)),
        };
        Bench {
            from,
            to,
            pristine,
            pristine_scan,
            pristine_meta,
            root,
            to_tree,
            ver,
            store: store.dir.clone(),
            logs,
        }
    }

    /// Back to the pristine from-image with rsync (never imageupd), and
    /// prove it: every path's type, target, metadata and link group (the
    /// crash oracle has already shown each file's content to be the old or
    /// the new image's, and those differ in size or mtime, which rsync's
    /// quick check sees). Should a difference remain (rsync does not set a
    /// directory mtime that differs by less than a second), start over with
    /// a full copy.
    fn reset(&self) {
        reset_tree(&self.pristine, &self.root);
        let d = diff_trees(
            &self.pristine_meta,
            &scan_opts(&self.root, &|r| is_state(r), false),
            "pristine",
            "reset root",
        );
        if !d.is_empty() {
            eprintln!(
                "crash: rsync reset left {} difference(s) ({}); copying afresh",
                d.len(),
                d.join("; ")
            );
            std::fs::remove_dir_all(&self.root).expect("remove root");
            copy_tree(&self.pristine, &self.root);
            let d = diff_trees(
                &self.pristine_scan,
                &snapshot_root(&self.root),
                "pristine",
                "copied root",
            );
            assert!(
                d.is_empty(),
                "cannot restore {} exactly:\n{}",
                self.from,
                clip(&d.join("\n"), 40)
            );
        }
    }

    fn apply_cmd(&self) -> Run {
        imageupd(["apply", "--from"])
            .arg(&self.store)
            .args(["--id", self.to, "--root"])
            .arg(&self.root)
            .arg("--json")
    }

    /// After an interruption: check the crash oracle, then re-apply and
    /// check convergence. `full` adds the rsync oracle.
    #[track_caller]
    fn check_and_converge(&self, what: &str, full: bool) {
        let what = format!("{} -> {}: {what}", self.from, self.to);
        let bad = crash_violations(&self.root, &self.ver);
        assert!(
            bad.is_empty(),
            "{what}: the interrupted apply left torn state:\n{}",
            clip(&bad.join("\n"), 60)
        );
        let out = self.apply_cmd().run();
        assert_eq!(
            out.code(),
            Some(EXIT_OK),
            "{what}: apply after the interruption failed\n{}",
            out.describe()
        );
        let result = out.json()["result"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            result == "applied" || result == "nothing-to-do",
            "{what}: unexpected result {result:?} after the interruption\n{}",
            out.describe()
        );
        let d = converge_diff(&self.ver.new, &self.root);
        assert!(
            d.is_empty(),
            "{what}: the re-run apply did not converge:\n{}",
            clip(&d.join("\n"), 60)
        );
        if full {
            let r = oracle(&self.to_tree, &self.root);
            assert!(
                r.trim().is_empty(),
                "{what}: rsync oracle after convergence:\n{}",
                clip(&r, 60)
            );
        }
        assert_eq!(
            image_id(&self.root).as_deref(),
            Some(self.to),
            "{what}: /etc/image_id after convergence"
        );
        let v = verify(&self.root, true);
        assert_eq!(
            v.code(),
            Some(EXIT_OK),
            "{what}: verify --checksum after convergence\n{}",
            v.describe()
        );
    }

    /// Start an apply and SIGKILL it after DELAY; returns whether it was
    /// killed (false: it had finished, successfully) and the delay.
    fn kill_after(&self, delay: Duration, what: &str) -> (bool, Duration) {
        let log = self.logs.join("apply.log");
        let (mut c, desc) = self.apply_cmd().into_command();
        let logf = std::fs::File::create(&log).unwrap();
        c.stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let killed = status.code().is_none();
        if !killed {
            assert_eq!(
                status.code(),
                Some(EXIT_OK),
                "{what}: apply exited by itself with a failure:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        (killed, delay)
    }

    /// Run an apply with IMAGEUPD_FAULT=POINT; true when it aborted there.
    fn fault(&self, point: &str) -> bool {
        self.reset();
        let out = self
            .apply_cmd()
            .env("IMAGEUPD_FAULT", point)
            .timeout(Duration::from_secs(300))
            .run();
        match out.signal() {
            Some(6) => true,
            _ => {
                assert_eq!(
                    out.code(),
                    Some(EXIT_OK),
                    "{} -> {}: IMAGEUPD_FAULT={point} neither aborted nor completed\n{}",
                    self.from,
                    self.to,
                    out.describe()
                );
                false
            }
        }
    }
}

#[test]
fn random_sigkill_during_apply_converges() {
    let t0 = Instant::now();
    let iterations: usize = std::env::var("IMAGEUPD_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("IMAGEUPD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x1de_a5ed);
    let s = scratch("crash-kill");
    let b = Bench::new(&s, "v1", "v2");

    // One uninterrupted apply to measure the window and to check the baseline.
    let out = b.apply_cmd().ok();
    assert_eq!(
        out.json()["result"].as_str(),
        Some("applied"),
        "{}",
        out.describe()
    );
    assert_applied(&b.to_tree, &b.root, "v2", "uninterrupted apply v1 -> v2");
    // A second, warm run gives the window the kills are spread over.
    b.reset();
    let warm = b.apply_cmd().ok();
    let full = out.elapsed.min(warm.elapsed);
    eprintln!("crash: full apply takes {full:.2?}; {iterations} kill points, seed {seed}");

    let mut rng = Rng::new(seed);
    let mut finished_before_kill = 0;
    for i in 0..iterations {
        b.reset();
        // sqrt biases towards the later part of the run, where staging and
        // the swap happen; the early part (plan, fetch) still gets samples.
        let frac = rng.unit().sqrt() * 0.95;
        let (killed, delay) = b.kill_after(full.mul_f64(frac), &format!("iteration {i}"));
        if !killed {
            finished_before_kill += 1;
        }
        let mut what = format!(
            "kill iteration {i} at {delay:.2?} ({:.0}% of a full apply, killed={killed})",
            frac * 100.0
        );
        // Every fifth iteration the recovering apply is killed too.
        if i % 5 == 4 {
            let bad = crash_violations(&b.root, &b.ver);
            assert!(
                bad.is_empty(),
                "{what}: torn state:\n{}",
                clip(&bad.join("\n"), 60)
            );
            let frac2 = rng.unit() * 0.95;
            let (killed2, delay2) =
                b.kill_after(full.mul_f64(frac2), &format!("iteration {i}, second kill"));
            what.push_str(&format!(
                ", then the recovering apply killed at {delay2:.2?} (killed={killed2})"
            ));
        }
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

/// Every fault point aborts an apply v1 -> v2, or, for points that update
/// does not reach (v1 -> v2 deletes nothing), an apply v2 -> v1; the crash
/// oracle and convergence are checked after each abort.
#[test]
fn every_fault_point_converges() {
    let t0 = Instant::now();
    let points = imageupd(["fault-points"]).ok().stdout;
    let points: Vec<String> = points
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        // The provisioning steps' points belong to `imageupd provision`
        // (and `provision --whole-disk`); tests/provision.rs crashes at
        // each of them.
        .filter(|l| !l.starts_with("provision-") && !l.starts_with("whole-disk-"))
        .map(String::from)
        .collect();
    assert!(
        !points.is_empty(),
        "imageupd fault-points listed no fault points"
    );
    let s = scratch("crash-fault");
    let forward = Bench::new(&s, "v1", "v2");
    let mut backward: Option<Bench> = None;
    let mut outcomes: BTreeMap<String, &str> = BTreeMap::new();
    for (i, fp) in points.iter().enumerate() {
        let full = i % 4 == 3 || i + 1 == points.len();
        if forward.fault(fp) {
            forward.check_and_converge(&format!("fault point {fp}"), full);
            outcomes.insert(fp.clone(), "v1->v2");
            continue;
        }
        forward.check_and_converge(&format!("fault point {fp} (not reached)"), false);
        let b = backward.get_or_insert_with(|| Bench::new(&s, "v2", "v1"));
        if b.fault(fp) {
            b.check_and_converge(&format!("fault point {fp}"), full);
            outcomes.insert(fp.clone(), "v2->v1");
        } else {
            b.check_and_converge(&format!("fault point {fp} (not reached)"), false);
            outcomes.insert(fp.clone(), "NOT REACHED");
        }
    }
    eprintln!(
        "crash: {} fault points in {:.1?}: {outcomes:?}",
        points.len(),
        t0.elapsed()
    );
    let missed: Vec<&String> = outcomes
        .iter()
        .filter(|(_, v)| **v == "NOT REACHED")
        .map(|(k, _)| k)
        .collect();
    assert!(
        missed.is_empty(),
        "fault points that neither apply v1 -> v2 nor v2 -> v1 reached (IMAGEUPD_FAULT=<name> must SIGABRT there): {missed:?}"
    );
}
