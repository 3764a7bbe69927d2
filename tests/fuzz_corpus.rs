//! The fuzz corpora replayed without a fuzz engine (issue 13): every file
//! below `fuzz/corpus/<target>/` (seeds and every input that once crashed
//! a target) is fed to its target in `imageupd::fuzzing`, which must
//! return without panicking. The fuzzer itself runs outside CI
//! (`fuzz/Cargo.toml`, README "Fuzzing").

use std::path::PathBuf;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

#[test]
fn every_target_has_a_corpus_and_replays_it() {
    let mut total = 0;
    for (name, _) in imageupd::fuzzing::TARGETS {
        let dir = corpus_dir().join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "fuzz target {name} has no seed in {}",
            dir.display()
        );
        for f in &files {
            let data = std::fs::read(f).expect("read corpus file");
            // A panic names the input that caused it.
            let r = std::panic::catch_unwind(|| imageupd::fuzzing::run(name, &data));
            assert!(
                matches!(r, Ok(true)),
                "fuzz target {name} panicked on {}",
                f.display()
            );
        }
        total += files.len();
    }
    // Every corpus directory belongs to a target (no stale names).
    for e in std::fs::read_dir(corpus_dir()).expect("fuzz/corpus") {
        let name = e.expect("entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            imageupd::fuzzing::TARGETS.iter().any(|(n, _)| *n == name),
            "fuzz/corpus/{name} is not a fuzz target"
        );
    }
    assert!(total >= imageupd::fuzzing::TARGETS.len());
}

#[test]
fn the_replay_catches_a_panicking_target() {
    // Positive control: an input that breaks an assertion inside a target
    // is reported as a panic by the same catch_unwind the replay uses.
    let r = std::panic::catch_unwind(|| imageupd::fuzzing::run("no-such-target", b""));
    assert!(matches!(r, Ok(false)), "an unknown target must be reported");
    let r = std::panic::catch_unwind(|| -> bool { panic!("a crash") });
    assert!(r.is_err());
}

/// A deterministic xorshift generator (no engine, no dependency).
struct Xs(u64);

impl Xs {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One blind mutation of SEED: flips, interesting bytes, inserts, deletes,
/// duplicated slices, splices of another seed.
fn mutate(r: &mut Xs, seed: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=r.below(4) {
        let at = r.below(v.len() + 1);
        match r.below(7) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << r.below(8);
            }
            1 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b'-', b'9'][r.below(9)];
            }
            2 => v.insert(at, r.next() as u8),
            3 if at < v.len() => {
                let n = r.below(v.len() - at).min(64) + 1;
                v.drain(at..(at + n).min(v.len()));
            }
            4 if at < v.len() => {
                let n = r.below(v.len() - at).min(256) + 1;
                let s: Vec<u8> = v[at..(at + n).min(v.len())].to_vec();
                v.splice(at..at, s);
            }
            5 if !other.is_empty() => {
                let from = r.below(other.len());
                let n = r.below(other.len() - from) + 1;
                v.truncate(at);
                v.extend_from_slice(&other[from..from + n]);
            }
            _ => v.truncate(at),
        }
    }
    v
}

/// Blind mutation fuzzing without a fuzz engine (no coverage feedback),
/// for machines where the cargo-fuzz build is not at hand:
/// `IMAGEUPD_FUZZ_EXECS=1000000 cargo test -p imageupd --test fuzz_corpus
/// -- --ignored --nocapture`. A panicking input is written to
/// `fuzz/corpus/<target>/crash-<n>` (so the replay above keeps it).
#[test]
#[ignore]
fn blind_mutation_of_the_corpora() {
    let execs: u64 = std::env::var("IMAGEUPD_FUZZ_EXECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let only = std::env::var("IMAGEUPD_FUZZ_TARGET").ok();
    std::panic::set_hook(Box::new(|_| {}));
    let mut crashes = Vec::new();
    for (name, _) in imageupd::fuzzing::TARGETS {
        if only.as_deref().is_some_and(|o| o != *name) {
            continue;
        }
        let dir = corpus_dir().join(name);
        let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .expect("corpus")
            .map(|e| std::fs::read(e.expect("entry").path()).expect("read"))
            .collect();
        let mut r = Xs(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        let t0 = std::time::Instant::now();
        for i in 0..execs {
            let seed = &seeds[r.below(seeds.len())];
            let other = &seeds[r.below(seeds.len())];
            let input = mutate(&mut r, seed, other);
            if std::panic::catch_unwind(|| imageupd::fuzzing::run(name, &input)).is_err() {
                let p = dir.join(format!("crash-{i}"));
                std::fs::write(&p, &input).expect("save crash");
                crashes.push(p.display().to_string());
            }
        }
        eprintln!(
            "{name}: {execs} execs in {:.1} s, {} crashes so far",
            t0.elapsed().as_secs_f64(),
            crashes.len()
        );
    }
    let _ = std::panic::take_hook();
    assert!(crashes.is_empty(), "crashing inputs: {crashes:?}");
}
