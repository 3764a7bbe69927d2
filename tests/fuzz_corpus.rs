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
