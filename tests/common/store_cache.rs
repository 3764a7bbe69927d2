//! One published store of v1, v2 and v3 for every test binary of a build.
//!
//! Each test binary used to publish v1, v2 and v3 into its own shared store:
//! about 20-50 s of hashing, compressing and delta search per binary, the
//! same work each time. The result depends only on the imageupd binary, the
//! fixture trees and the publish level, so it is published once into the
//! fixture cache under a key of those three, and each binary starts from a
//! private copy of it (tests may damage their shared store; never the cache).
//!
//! The cache is built and read under one `flock`, built in a temporary
//! directory and renamed into place, so concurrent test processes never see
//! half of one. A new binary (every build) makes a new key; stale keys are
//! removed, keeping the [`KEEP`] most recently used.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::Digest as _;

use super::*;

/// Images in the cached store, each after its parent.
pub const CACHED: [(&str, Option<&str>); 3] =
    [("v1", None), ("v2", Some("v1")), ("v3", Some("v1"))];

/// Cached stores kept (most recently used), for worktrees testing side by side.
const KEEP: usize = 3;

/// Name of the publisher key inside a cached store directory.
const KEY_NAME: &str = "publisher";

/// The cache key: the binary (size, mtime, inode), the fixture trees' stamps
/// and the publish level.
fn key() -> String {
    let mut h = sha2::Sha256::new();
    let b = std::fs::metadata(bin()).expect("stat the imageupd binary");
    h.update(format!(
        "{} {} {} {}\n",
        b.len(),
        b.mtime(),
        b.mtime_nsec(),
        b.ino()
    ));
    for (id, _) in CACHED {
        let stamp = cache_dir().join(format!(".stamp-{id}"));
        let m = std::fs::metadata(&stamp).unwrap_or_else(|e| panic!("{}: {e}", stamp.display()));
        h.update(format!("{id} {} {}\n", m.mtime(), m.mtime_nsec()));
    }
    h.update(LEVEL.as_bytes());
    hex_of(&h.finalize())[..16].to_string()
}

/// Copy the cached store of v1, v2, v3 (publishing it first if this build
/// has none) to BASE/store, with its key at BASE/publisher; returns the key.
pub fn seed(base: &Path) -> Key {
    // The stamps in the key are written by the tree build.
    trees();
    let top = cache_dir().join("stores");
    std::fs::create_dir_all(&top).expect("create the store cache");
    let lock = File::create(top.join(".lock")).expect("open the store cache lock");
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the store cache");
    let dir = top.join(key());
    if !dir.join(".complete").exists() {
        build(&dir);
    }
    // Touched on use, so pruning keeps what is in use.
    File::create(dir.join(".used")).expect("mark the cached store used");
    prune(&top, &dir);
    copy(&dir.join("store"), &base.join("store"));
    for f in [KEY_NAME.to_string(), format!("{KEY_NAME}.pub")] {
        copy(&dir.join(&f), &base.join(&f));
    }
    Key {
        secret: base.join(KEY_NAME),
        public: base.join(format!("{KEY_NAME}.pub")),
    }
}

fn build(dir: &Path) {
    let tmp = PathBuf::from(format!("{}.tmp", dir.display()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("create the cached store");
    let key = keygen(&tmp, KEY_NAME);
    let t = Instant::now();
    for (id, parent) in CACHED {
        publish(
            &tmp.join("store"),
            id,
            Some(&key),
            parent,
            &fixture_tree(id),
        );
    }
    eprintln!(
        "published v1, v2, v3 into {} in {:.1?}",
        dir.display(),
        t.elapsed()
    );
    File::create(tmp.join(".complete")).expect("mark the cached store complete");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).expect("move the cached store into place");
}

fn prune(top: &Path, current: &Path) {
    let mut others: Vec<(i64, PathBuf)> = std::fs::read_dir(top)
        .expect("list the store cache")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p != current)
        .map(|p| {
            let used = std::fs::metadata(p.join(".used"))
                .map(|m| m.mtime())
                .unwrap_or(0);
            (used, p)
        })
        .collect();
    others.sort();
    let excess = (others.len() + 1).saturating_sub(KEEP);
    for (_, p) in others.into_iter().take(excess) {
        if let Err(e) = std::fs::remove_dir_all(&p) {
            eprintln!("store cache: cannot remove {}: {e}", p.display());
        }
    }
}

fn copy(src: &Path, dst: &Path) {
    let out = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(src)
        .arg(dst)
        .output()
        .expect("run cp");
    assert!(
        out.status.success(),
        "cp -a {} {}: {}",
        src.display(),
        dst.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}
