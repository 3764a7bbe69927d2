//! Power loss, replayed (issue 13; TRUST.md B1–B4): an `imageupd apply`
//! v1 -> v2 runs inside one TCG guest (the Debian cloud kernel of the VM
//! kit) with the root under dm-log-writes, on ext4, ext4 `noauto_da_alloc`
//! and xfs, and once more on each with the pre-swap syncfs skipped (the
//! positive control, `IMAGEUPD_TEST_UNSAFE_SKIP=presync-syncfs`). The host
//! then replays each write log (tests/common/logwrites.rs) to every MARK
//! (one per phase of the apply) and a deterministic sample of FLUSH/FUA
//! points, a few in each phase ([`PHASES`]: journal, stage, pre-swap sync,
//! swap renames, delete, image_id, commit, unmount), and at each point
//! mounts a copy (journal recovery) and requires:
//!
//! * every path wholly v1 or wholly v2 by hash, and nothing that is in
//!   neither image outside the preserve list and the staging areas;
//! * the apply journal parses;
//! * `fsck -n` clean (`e2fsck -fn`, `xfs_repair -n`);
//! * a re-run of `apply` converges to v2 (metadata oracle) and `verify
//!   --checksum` is clean.
//!
//! Self-check: the whole log replayed must give a device byte-identical to
//! the guest's final root disk. The control must show at least one torn
//! path, or the test proves nothing.
//!
//! Tunables: IMAGEUPD_POWERLOSS_POINTS=all replays every point (outside
//! CI: several minutes), =N takes N FLUSH/FUA points per phase (default
//! [`DEFAULT_PER_PHASE`]; marks always); IMAGEUPD_TEST_NO_VM=1 skips.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::logwrites::{self, Log, SynthData, FLUSH, FUA, MARK};
use common::powerloss::{self as pl, Scenario};
use common::vm;
use common::vm::OsArg;
use common::*;

/// FLUSH/FUA points replayed per phase of the apply when
/// IMAGEUPD_POWERLOSS_POINTS is unset (marks are always replayed).
const DEFAULT_PER_PHASE: usize = 2;
/// Threads checking replayed points (the machine has 2 cores).
const WORKERS: usize = 2;
/// Size cap of the tmpfs holding the working copy and the points' copies,
/// in MiB (sparse: it holds what they wrote, under 1 GiB at 2 workers).
const TMPFS_MIB: u64 = 4096;
/// Marks every recorded apply must leave in its log (the fault points of
/// the phases, the guest's own, and dm-log-writes' end mark).
const EXPECTED_MARKS: &[&str] = &[
    "start",
    "after-journal-begin",
    "after-stage",
    "after-presync",
    "after-swap",
    "after-delete",
    "after-image-id",
    "after-commit",
    "unmounted",
    "dm-log-writes-end",
];

/// Kinds with content identity of both images.
struct Versions {
    old: Tree,
    new: Tree,
}

/// Staging areas an interrupted run may leave (removed by the next run).
fn is_staging(rel: &[u8]) -> bool {
    rel == b".imageupd-stage" || rel.starts_with(b".imageupd-stage/")
}

/// A small file's temporary twin (`NAME.imageupd-tmp`, fsx::write_atomic):
/// a power cut between its fsync and the rename leaves it; the next run
/// replaces it (the re-run must not leave it: [`converge`] compares with
/// v2).
fn is_temp(rel: &[u8]) -> bool {
    rel.ends_with(b".imageupd-tmp")
}

/// What [`crash_check`] found at a crash point.
#[derive(Default)]
struct Found {
    /// Paths in neither version, or missing though both images have it.
    torn: Vec<String>,
    /// Paths in neither image (not staging areas, not the agent's temps).
    stray: Vec<String>,
    /// The agent's own temporary files ([`is_temp`]).
    temps: Vec<String>,
}

/// Compare the tree at a crash point with both images.
fn crash_check(root: &Path, ver: &Versions) -> Found {
    let now = scan(root, &|r| is_preserved(r) || is_staging(r));
    let mut f = Found::default();
    for (p, n) in &now {
        let old = ver.old.get(p).map(|x| &x.kind);
        let new = ver.new.get(p).map(|x| &x.kind);
        if old.is_none() && new.is_none() && is_temp(p) {
            f.temps.push(show(p));
        } else if old.is_none() && new.is_none() {
            f.stray
                .push(format!("{}: in neither image ({:?})", show(p), n.kind));
        } else if old != Some(&n.kind) && new != Some(&n.kind) {
            f.torn
                .push(format!("{}: neither version: {:?}", show(p), n.kind));
        }
    }
    for p in ver.old.keys().filter(|p| ver.new.contains_key(*p)) {
        if !now.contains_key(p) {
            f.torn
                .push(format!("{}: missing, but both images have it", show(p)));
        }
    }
    f
}

/// A tmpfs of our own for the replayed copies (each a few hundred MB, made,
/// mounted and dropped per point: RAM, not the host's disk), unmounted on
/// drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        cmd(
            "mount",
            [
                OsArg::from("-t"),
                "tmpfs".into(),
                "-o".into(),
                format!("size={TMPFS_MIB}m,mode=0700").into(),
                "powerloss".into(),
                at.into(),
            ],
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        umount_retrying(&self.0);
    }
}

/// A loop mount, unmounted on drop.
struct Mounted(PathBuf);

impl Mounted {
    fn new(img: &Path, mnt: &Path, opts: &str) -> Result<Mounted, String> {
        std::fs::create_dir_all(mnt).unwrap();
        let out = Run::new("mount")
            .arg("-o")
            .arg(opts)
            .arg(img)
            .arg(mnt)
            .run();
        if out.code() != Some(0) {
            return Err(format!("mount failed: {}", out.describe()));
        }
        Ok(Mounted(mnt.to_path_buf()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        umount_retrying(&self.0);
    }
}

/// Unmount what this test mounted at `at`; "busy" is retried for a few
/// seconds (something else on the host may be walking the mount table).
fn umount_retrying(at: &Path) {
    let mut tries = 0;
    loop {
        let out = Run::new("umount").arg(at).run();
        if out.code() == Some(0) {
            return;
        }
        tries += 1;
        if tries < 30 && out.all_output().contains("busy") {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        if !std::thread::panicking() {
            panic!("umount {}: {}", at.display(), out.describe());
        }
        return;
    }
}

/// What one crash point showed.
#[derive(Default)]
struct PointResult {
    torn: Vec<String>,
    stray: Vec<String>,
    temps: usize,
    /// Time in the first mount and the tree comparison, fsck, and the
    /// re-run with its checks.
    took: [Duration; 3],
    /// Journal, fsck, mount, convergence or verify failures.
    failures: Vec<String>,
    fsck_error: bool,
    converged: bool,
}

/// Everything the replay of one scenario showed.
#[derive(Default)]
struct Outcome {
    entries: usize,
    flush_points: usize,
    marks: Vec<String>,
    points: usize,
    torn_points: usize,
    max_torn: usize,
    first_torn: Vec<String>,
    strays: usize,
    /// Points that showed one of the agent's temporary files.
    temp_points: usize,
    /// Chosen points skipped as the same state as the point before.
    same_state: usize,
    fsck_errors: usize,
    converged: usize,
    failures: Vec<String>,
    /// Per phase (and "mark", "window"): points replayed, points torn.
    phases: std::collections::BTreeMap<&'static str, (usize, usize)>,
    /// Summed over the points: see [`PointResult::took`].
    check_time: [Duration; 3],
    self_check: bool,
    took: Duration,
}

/// The phases of an apply, each between two marks of its log (the fault
/// points of agent/src/apply): name, opening mark, closing mark.
const PHASES: &[(&str, &str, &str)] = &[
    // The journal's "staging" record.
    ("journal", "start", "after-journal-begin"),
    // Staged files written (no fsync of their own).
    ("stage", "after-journal-begin", "after-stage"),
    // The journal's "swapping", then the syncfs before the first rename.
    ("presync", "after-stage", "after-presync"),
    // The renames into place.
    ("swap", "after-presync", "after-swap"),
    ("delete", "after-swap", "after-delete"),
    // Records, directory metadata, the syncfs after the swap, etc/image_id.
    ("image_id", "after-delete", "after-image-id"),
    // The journal's "committed" and its syncfs.
    ("commit", "after-image-id", "after-commit"),
    // Read-only again and unmounted.
    ("unmount", "after-commit", "unmounted"),
];

/// How many replay points to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sampling {
    /// Every mark, and this many FLUSH/FUA points per phase.
    PerPhase(usize),
    /// Every mark and every FLUSH/FUA point.
    All,
}

impl Sampling {
    /// From IMAGEUPD_POWERLOSS_POINTS: `all`, or points per phase.
    fn from_env() -> Sampling {
        match std::env::var("IMAGEUPD_POWERLOSS_POINTS").ok().as_deref() {
            None | Some("") => Sampling::PerPhase(DEFAULT_PER_PHASE),
            Some("all") => Sampling::All,
            Some(n) => Sampling::PerPhase(n.parse().unwrap_or_else(|_| {
                panic!("IMAGEUPD_POWERLOSS_POINTS={n:?}: `all` or points per phase")
            })),
        }
    }
}

/// The replay points of a log, in log order, each with the phase it was
/// taken for ("mark" for a mark): every MARK and, in each phase, FLUSH/FUA
/// entries after at least one write (a point with no write since the last
/// one is the same state), sampled. Deterministic: the same log gives the
/// same points. A control (`window`) takes instead every mark and
/// FLUSH/FUA point from after-stage to after-commit: the phases where its
/// torn states lie (renames durable, data not), a superset of the
/// sampled ones there. Returns the points and how many chosen points were
/// dropped as the same state (no write in between) as the one before.
fn choose_points(
    log: &Log,
    sampling: Sampling,
    window: bool,
) -> (Vec<(usize, &'static str)>, usize) {
    let marks = log.marks();
    let mark_at = |name: &str| marks.iter().find(|(_, m)| m == name).map(|(i, _)| *i);
    let mut dirty = false;
    let mut flushes = Vec::new();
    for (i, e) in log.entries.iter().enumerate() {
        dirty |= e.has_data();
        if e.flags & MARK != 0 {
            dirty = false;
        } else if e.flags & (FLUSH | FUA) != 0 && dirty {
            dirty = false;
            flushes.push(i);
        }
    }
    let mut pts: Vec<(usize, &'static str)> = marks.iter().map(|(i, _)| (*i, "mark")).collect();
    if window {
        let lo = mark_at("after-stage").unwrap_or(0);
        let hi = mark_at("after-commit").unwrap_or(log.entries.len());
        pts.retain(|(i, _)| (lo..=hi).contains(i));
        pts.extend(
            flushes
                .iter()
                .filter(|i| (lo..hi).contains(*i))
                .map(|&i| (i, "window")),
        );
    } else {
        for (phase, open, close) in PHASES {
            let (Some(lo), Some(hi)) = (mark_at(open), mark_at(close)) else {
                // A missing mark fails the test (EXPECTED_MARKS) on its own.
                continue;
            };
            let inside: Vec<usize> = flushes
                .iter()
                .copied()
                .filter(|i| (lo..hi).contains(i))
                .collect();
            let k = match sampling {
                Sampling::All => inside.len(),
                Sampling::PerPhase(k) => k.min(inside.len()),
            };
            pts.extend(spread(&inside, k).into_iter().map(|i| (i, *phase)));
        }
    }
    // A flush point's phase wins over a mark at the same entry (none).
    pts.sort_unstable_by_key(|p| p.0);
    pts.dedup_by_key(|p| p.0);
    // Replaying to a point with no write since the previous one gives the
    // same device bytes: checking it again would prove nothing new.
    let mut kept: Vec<(usize, &'static str)> = Vec::with_capacity(pts.len());
    let mut same = 0;
    for p in pts {
        let fresh = match kept.last() {
            None => true,
            Some(&(prev, _)) => log.entries[prev + 1..=p.0].iter().any(|e| e.has_data()),
        };
        if fresh {
            kept.push(p);
        } else {
            same += 1;
            // The later point's phase names the state better (a flush point
            // over the mark just before it).
            if p.1 != "mark" {
                kept.last_mut().expect("kept").1 = p.1;
            }
        }
    }
    (kept, same)
}

/// `k` elements of `v`, evenly spaced: for k = 1 the last (the phase's
/// most complete state), for k >= 2 the first (its first durable step) and
/// the last among them.
fn spread(v: &[usize], k: usize) -> Vec<usize> {
    match k {
        0 => Vec::new(),
        1 => v.last().copied().into_iter().collect(),
        _ => (0..k).map(|i| v[i * (v.len() - 1) / (k - 1)]).collect(),
    }
}

/// Check one crash state: `copy`, a copy of the device replayed to a
/// point (removed afterwards), mounted at `mnt`.
fn check_point(
    sc: &Scenario,
    copy: &Path,
    mnt: &Path,
    ver: &Versions,
    store: &Path,
    full: bool,
) -> PointResult {
    let mut r = PointResult::default();
    let opts = sc.host_mount_opts();
    let t = Instant::now();
    match Mounted::new(copy, mnt, &opts) {
        Err(e) => r.failures.push(format!("journal recovery: {e}")),
        Ok(m) => {
            let f = crash_check(mnt, ver);
            (r.torn, r.stray, r.temps) = (f.torn, f.stray, f.temps.len());
            if let Err(e) = journal_parses(mnt) {
                r.failures.push(e);
            }
            drop(m);
        }
    }
    r.took[0] = t.elapsed();
    if full {
        let t = Instant::now();
        let fsck = match sc.fs {
            "xfs" => Run::new("xfs_repair").args(["-n", "-f"]).arg(copy).run(),
            _ => Run::new("e2fsck").arg("-fn").arg(copy).run(),
        };
        if fsck.code() != Some(0) {
            r.fsck_error = true;
            r.failures
                .push(format!("fsck: {}", clip(&fsck.all_output(), 20)));
        }
        r.took[1] = t.elapsed();
        let t = Instant::now();
        match Mounted::new(copy, mnt, &opts) {
            Err(e) => r.failures.push(e),
            Ok(m) => {
                r.converged = converge(mnt, ver, store, &mut r.failures);
                drop(m);
            }
        }
        r.took[2] = t.elapsed();
    }
    std::fs::remove_file(copy).unwrap();
    r
}

/// The apply journal at a crash point parses, in a phase we know.
fn journal_parses(root: &Path) -> Result<(), String> {
    let b = std::fs::read(root.join("var/lib/imageupd/journal.json"))
        .map_err(|e| format!("journal.json: {e}"))?;
    match serde_json::from_slice::<serde_json::Value>(&b) {
        Ok(j)
            if ["staging", "swapping", "committed", "aborted"]
                .contains(&j["phase"].as_str().unwrap_or("")) =>
        {
            Ok(())
        }
        Ok(j) => Err(format!("journal.json: unknown phase in {j}")),
        Err(e) => Err(format!(
            "journal.json does not parse ({e}): {:?}",
            String::from_utf8_lossy(&b)
        )),
    }
}

/// Re-run the apply; true when it converges to v2 and `verify --checksum`
/// is clean.
fn converge(root: &Path, ver: &Versions, store: &Path, failures: &mut Vec<String>) -> bool {
    let out = apply(store, "v2", root, &[]);
    if out.code() != Some(EXIT_OK) {
        failures.push(format!("re-run apply failed: {}", out.describe()));
        return false;
    }
    let d = diff_trees(&ver.new, &scan(root, &|r| is_preserved(r)), "v2", "root");
    if !d.is_empty() {
        failures.push(format!(
            "re-run apply did not converge: {}",
            clip(&d.join("\n"), 10)
        ));
        return false;
    }
    let v = verify(root, true);
    if v.code() != Some(EXIT_OK) {
        failures.push(format!(
            "verify --checksum after the re-run: {}",
            v.describe()
        ));
        return false;
    }
    true
}

/// Replay one scenario's log to each chosen point and check it; then the
/// whole log, against the guest's final disk.
fn replay(
    sc: &Scenario,
    dir: &Path,
    copies: &Path,
    ver: &Versions,
    store: &Path,
    sampling: Sampling,
) -> Outcome {
    let t0 = Instant::now();
    let full = sc.skip.is_none();
    let log = Log::open(&sc.log).unwrap_or_else(|e| panic!("{}: {e}", sc.log.display()));
    let mut o = Outcome {
        entries: log.entries.len(),
        flush_points: log
            .entries
            .iter()
            .filter(|e| e.flags & (FLUSH | FUA) != 0)
            .count(),
        marks: log.marks().into_iter().map(|(_, m)| m).collect(),
        ..Default::default()
    };
    let work = copies.join(format!("{}.work.img", sc.name));
    cmd(
        "cp",
        [
            OsArg::from("--sparse=always"),
            sc.pristine.clone().into(),
            work.clone().into(),
        ],
    );
    let dev = std::fs::OpenOptions::new().write(true).open(&work).unwrap();
    let mut at = 0;
    // The replay is incremental on one working copy; each point's copy is
    // checked by one of WORKERS threads while the replay goes on.
    type Job = (usize, &'static str, PathBuf);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(1);
    let rx = std::sync::Mutex::new(rx);
    let (rtx, rrx) = std::sync::mpsc::channel::<(usize, &'static str, PointResult)>();
    std::thread::scope(|scope| {
        for w in 0..WORKERS {
            let (rx, rtx) = (&rx, rtx.clone());
            let mnt = dir.join(format!("{}.mnt{w}", sc.name));
            scope.spawn(move || loop {
                let job = rx.lock().unwrap().recv();
                let Ok((p, phase, copy)) = job else { break };
                let r = check_point(sc, &copy, &mnt, ver, store, full);
                if rtx.send((p, phase, r)).is_err() {
                    break;
                }
            });
        }
        drop(rtx);
        let (points, same) = choose_points(&log, sampling, !full);
        o.same_state = same;
        for (k, (p, phase)) in points.into_iter().enumerate() {
            log.replay(&dev, at, p + 1).unwrap();
            at = p + 1;
            let copy = copies.join(format!("{}.point{k}.img", sc.name));
            cmd("cp", [&work, &copy]);
            tx.send((p, phase, copy)).unwrap();
        }
        drop(tx);
    });
    for (p, phase, r) in rrx {
        o.points += 1;
        let ph = o.phases.entry(phase).or_default();
        ph.0 += 1;
        ph.1 += usize::from(!r.torn.is_empty());
        if !r.torn.is_empty() {
            o.torn_points += 1;
            if r.torn.len() > o.max_torn {
                o.max_torn = r.torn.len();
                o.first_torn = r.torn.iter().take(5).cloned().collect();
            }
        }
        o.strays += r.stray.len();
        o.temp_points += usize::from(r.temps > 0);
        for (sum, t) in o.check_time.iter_mut().zip(r.took) {
            *sum += t;
        }
        o.fsck_errors += usize::from(r.fsck_error);
        o.converged += usize::from(r.converged);
        let what = format!("{} at entry {p} ({phase})", sc.name);
        o.failures
            .extend(r.stray.iter().take(5).map(|s| format!("{what}: stray {s}")));
        if full {
            o.failures
                .extend(r.torn.iter().take(5).map(|s| format!("{what}: torn {s}")));
        }
        o.failures
            .extend(r.failures.into_iter().map(|s| format!("{what}: {s}")));
    }
    log.replay(&dev, at, log.entries.len()).unwrap();
    drop(dev);
    o.self_check = logwrites::same_bytes(&work, &sc.root).unwrap();
    std::fs::remove_file(&work).unwrap();
    o.took = t0.elapsed();
    o
}

#[test]
fn replayer_reads_a_synthetic_log() {
    let s = scratch("logwrites");
    let log = s.join("log");
    let a: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    logwrites::write_synthetic(
        &log,
        512,
        &[
            (0, MARK, SynthData::Mark("start".into())),
            (4, 0, SynthData::Sectors(a.clone())),
            (0, FLUSH, SynthData::Sectors(Vec::new())),
            (5, FUA, SynthData::Sectors(vec![7u8; 512])),
            (4, logwrites::DISCARD, SynthData::Discard(1)),
            (0, MARK, SynthData::Mark("end".into())),
        ],
    );
    let l = Log::open(&log).unwrap();
    assert_eq!(l.entries.len(), 6);
    assert_eq!(
        l.marks(),
        vec![(0, "start".to_string()), (5, "end".to_string())]
    );
    assert!(l.entries[2].is_point() && l.entries[3].is_point() && !l.entries[1].is_point());
    let dev_path = s.join("dev");
    std::fs::write(&dev_path, vec![0u8; 8 * 512]).unwrap();
    let dev = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev_path)
        .unwrap();
    // To the flush: the first write only.
    l.replay(&dev, 0, 3).unwrap();
    let b = std::fs::read(&dev_path).unwrap();
    assert_eq!(&b[4 * 512..6 * 512], &a[..]);
    // On: the FUA write overwrites sector 5, the discard zeroes sector 4.
    l.replay(&dev, 3, 6).unwrap();
    let b = std::fs::read(&dev_path).unwrap();
    assert!(b[4 * 512..5 * 512].iter().all(|&x| x == 0));
    assert!(b[5 * 512..6 * 512].iter().all(|&x| x == 7));
    // Damage is reported, not replayed.
    let mut raw = std::fs::read(&log).unwrap();
    raw[0] ^= 1;
    assert!(logwrites::parse_super(&raw).unwrap_err().contains("magic"));
    raw[0] ^= 1;
    std::fs::write(&log, &raw[..raw.len() - 512 * 3]).unwrap();
    let e = Log::open(&log)
        .err()
        .expect("a truncated log must not open");
    assert!(
        e.contains("past the log's end") || e.contains("overrun"),
        "{e}"
    );
    let mut h = vec![0u8; 512];
    h[16] = 0x40;
    assert!(logwrites::parse_entry(&h)
        .unwrap_err()
        .contains("unknown flags"));
}

#[test]
fn sampling_takes_every_mark_and_each_phase_first_and_last() {
    let s = scratch("logwrites-sampling");
    let path = s.join("log");
    let w = || SynthData::Sectors(vec![1u8; 512]);
    let none = || SynthData::Sectors(Vec::new());
    let mark = |m: &str| (0, MARK, SynthData::Mark(m.into()));
    // Per phase: write+flush three times; the stage phase also has a flush
    // with no write before it (the same state), and the delete phase none.
    let mut e = Vec::new();
    for (i, (_, open, _)) in PHASES.iter().enumerate() {
        e.push(mark(open));
        if *open == "after-swap" {
            continue;
        }
        for _ in 0..3 {
            e.push((i as u64, 0, w()));
            e.push((0, FLUSH, none()));
        }
        if *open == "after-journal-begin" {
            e.push((0, FLUSH, none()));
        }
    }
    e.push(mark("unmounted"));
    e.push(mark("dm-log-writes-end"));
    logwrites::write_synthetic(&path, 512, &e);
    let log = Log::open(&path).unwrap();
    let (pts, same) = choose_points(&log, Sampling::PerPhase(2), false);
    let phase_of = |i: usize| {
        let marks = log.marks();
        marks.iter().rev().find(|(m, _)| *m <= i).unwrap().1.clone()
    };
    for (phase, open, _) in PHASES {
        let got: Vec<usize> = pts.iter().filter(|p| p.1 == *phase).map(|p| p.0).collect();
        if *open == "after-swap" {
            assert!(got.is_empty(), "{phase}: no flush, no point: {pts:?}");
            continue;
        }
        assert_eq!(got.len(), 2, "{phase}: first and last: {pts:?}");
        assert!(
            got.iter().all(|&i| phase_of(i) == *open),
            "{phase}: {pts:?}"
        );
    }
    // Every mark is a point unless its state is the one before it: here
    // only the start (each phase's last point has no write after it).
    let marks: Vec<usize> = pts.iter().filter(|p| p.1 == "mark").map(|p| p.0).collect();
    assert_eq!(marks, vec![0], "{pts:?}");
    assert_eq!(same, log.marks().len() - 1, "{pts:?}");
    // All: every flush after a write.
    let (all, _) = choose_points(&log, Sampling::All, false);
    assert_eq!(all.len(), 1 + 3 * (PHASES.len() - 1), "{all:?}");
    // The control: the swap window only, every flush point in it.
    let (win, _) = choose_points(&log, Sampling::PerPhase(1), true);
    assert!(
        win.iter().all(|p| {
            let m = phase_of(p.0);
            [
                "after-stage",
                "after-presync",
                "after-swap",
                "after-delete",
                "after-image-id",
            ]
            .contains(&m.as_str())
        }),
        "{win:?}"
    );
    // The after-stage mark, then the flushes of 4 phases (delete has none).
    assert_eq!(win.len(), 1 + 3 * 4, "{win:?}");
}

#[test]
fn power_loss_replayed_at_flush_points() {
    if vm::skip() {
        return;
    }
    let t0 = Instant::now();
    let store = shared_store();
    let (v1, v2) = (store.image("v1"), store.image("v2"));
    let s = scratch("powerloss");
    let dir = s.path();
    let node = dir.join("node");
    install_root(store, "v1", &node);
    let (kernel, moddir) = pl::kernel();
    let ext4 = pl::root_image(dir, "ext4", &node);
    let xfs = pl::root_image(dir, "xfs", &node);
    std::fs::remove_dir_all(&node).unwrap();
    let mut scenarios = Vec::new();
    for skip in [None, Some(imageupd_skip())] {
        for (name, fs, opts, img) in [
            ("ext4", "ext4", "", &ext4),
            ("ext4-noauto", "ext4", ",noauto_da_alloc", &ext4),
            ("xfs", "xfs", "", &xfs),
        ] {
            let name = if skip.is_some() {
                format!("control-{name}")
            } else {
                name.to_string()
            };
            let root = dir.join(format!("{name}.root.img"));
            cmd(
                "cp",
                [
                    OsArg::from("--sparse=always"),
                    img.into(),
                    root.clone().into(),
                ],
            );
            let log = dir.join(format!("{name}.log.img"));
            pl::sparse(&log, pl::LOG_MIB);
            scenarios.push(Scenario {
                name,
                fs,
                opts,
                skip,
                pristine: img.clone(),
                root,
                log,
            });
        }
    }
    let store_img = pl::store_image(dir, &store.dir);
    // Dropped before `s` removes the directory.
    let copies = Tmpfs::mount(&dir.join("copies"));
    let initrd = pl::initramfs(dir, &moddir, &scenarios);
    let prep = t0.elapsed();
    let (rcs, guest) = pl::run_guest_retrying(dir, &kernel, &initrd, &store_img, &scenarios);
    for sc in &scenarios {
        assert_eq!(
            rcs.get(&sc.name),
            Some(&0),
            "{}: the apply in the guest failed (see its console log)",
            sc.name
        );
    }
    let ver = Versions {
        old: scan(&v1, &|r| is_preserved(r)),
        new: scan(&v2, &|r| is_preserved(r)),
    };
    let sampling = Sampling::from_env();
    let mut table = vec![table_header()];
    let mut failures = Vec::new();
    let mut control_torn = Vec::new();
    for sc in &scenarios {
        let o = replay(sc, dir, &copies.0, &ver, &store.dir, sampling);
        table.push(table_line(sc, &o));
        eprintln!("powerloss: {}", table.last().unwrap());
        let per_phase: Vec<String> = o
            .phases
            .iter()
            .map(|(ph, (n, torn))| format!("{ph} {n}/{torn}"))
            .collect();
        eprintln!(
            "powerloss:   {} points/torn by phase: {}",
            sc.name,
            per_phase.join(", ")
        );
        if sc.skip.is_none() {
            // Each of these phases makes something durable (fsync, syncfs):
            // its log must show at least one flush to replay to.
            for ph in ["journal", "presync", "image_id", "commit"] {
                if !o.phases.contains_key(ph) {
                    failures.push(format!(
                        "{}: no FLUSH/FUA point in phase {ph} (by phase: {per_phase:?})",
                        sc.name
                    ));
                }
            }
        }
        for f in o.failures.iter().take(5) {
            eprintln!("powerloss:   {f}");
        }
        if !o.self_check {
            failures.push(format!(
                "{}: replaying the whole log does not give the guest's final disk",
                sc.name
            ));
        }
        for m in EXPECTED_MARKS {
            if !o.marks.iter().any(|x| x == m) {
                failures.push(format!(
                    "{}: no mark {m} in the log (marks: {:?})",
                    sc.name, o.marks
                ));
            }
        }
        if sc.skip.is_some() {
            control_torn.push((
                sc.name.clone(),
                o.torn_points,
                o.max_torn,
                o.first_torn.clone(),
            ));
            if o.torn_points == 0 {
                failures.push(format!(
                    "positive control {}: with the pre-swap syncfs skipped, no replayed point showed a torn file: the replay on {}{} proves nothing",
                    sc.name, sc.fs, sc.opts
                ));
            }
        } else {
            failures.extend(o.failures.into_iter().take(20));
            if o.torn_points > 0 || o.fsck_errors > 0 || o.converged != o.points {
                failures.push(format!(
                    "{}: {} torn points, {} fsck errors, {}/{} converged",
                    sc.name, o.torn_points, o.fsck_errors, o.converged, o.points
                ));
            }
        }
    }
    eprintln!(
        "powerloss: prep {prep:.1?}, guest {guest:.1?}, total {:.1?}; sampling {sampling:?} (marks always)\n{}",
        t0.elapsed(),
        table.join("\n")
    );
    for (name, points, torn, first) in &control_torn {
        eprintln!(
            "powerloss: {name}: {points} torn points, at worst {torn} torn paths, e.g. {first:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "power-loss replay:\n{}\n{}",
        failures.join("\n"),
        table.join("\n")
    );
    assert_eq!(control_torn.len(), 3, "a control per filesystem");
}

fn table_header() -> String {
    format!(
        "{:<20} {:>7} {:>6} {:>6} {:>5} {:>8} {:>6} {:>6} {:>5} {:>5} {:>10} {:>5} {:>7}  check: mount+cmp / fsck / re-run (summed)",
        "scenario",
        "entries",
        "flush",
        "points",
        "same",
        "torn-pts",
        "torn",
        "stray",
        "temps",
        "fsck",
        "converged",
        "self",
        "time"
    )
}

fn table_line(sc: &Scenario, o: &Outcome) -> String {
    format!(
        "{:<20} {:>7} {:>6} {:>6} {:>5} {:>8} {:>6} {:>6} {:>5} {:>5} {:>10} {:>5} {:>6.1?}  {:.1?} / {:.1?} / {:.1?}",
        sc.name,
        o.entries,
        o.flush_points,
        o.points,
        o.same_state,
        o.torn_points,
        o.max_torn,
        o.strays,
        o.temp_points,
        o.fsck_errors,
        if sc.skip.is_none() {
            format!("{}/{}", o.converged, o.points)
        } else {
            "-".into()
        },
        if o.self_check { "ok" } else { "DIFF" },
        o.took,
        o.check_time[0],
        o.check_time[1],
        o.check_time[2],
    )
}

/// The control's `IMAGEUPD_TEST_UNSAFE_SKIP` value (agent/src/sys/fault.rs).
fn imageupd_skip() -> &'static str {
    imageupd::sys::fault::SKIP_PRESYNC
}
