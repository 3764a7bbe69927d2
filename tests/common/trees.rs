//! The fixture trees (the cached debootstrap trees v1, v2, v3 and the
//! synthetic pair s1, s2) and scratch space: directories, copies, resets.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use sha2::Digest as _;

use super::*;

/// Where build-trees.sh keeps the real trees.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("IMAGEUPD_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/imageupd-test".into())
}

/// The cached debootstrap trees.
pub struct Trees {
    /// bookworm minbase.
    pub v1: PathBuf,
    /// v1 + less, vim-tiny, iproute2, an edited /etc/login.defs.
    pub v2: PathBuf,
    /// v1 with one binary changed.
    pub v3: PathBuf,
}

impl Trees {
    pub fn get(&self, id: &str) -> &Path {
        match id {
            "v1" => &self.v1,
            "v2" => &self.v2,
            "v3" => &self.v3,
            _ => panic!("no fixture tree {id}"),
        }
    }
}

/// The real trees, built by tests/fixtures/build-trees.sh when the cache is
/// not complete yet.
pub fn trees() -> &'static Trees {
    static T: OnceLock<Trees> = OnceLock::new();
    T.get_or_init(|| {
        let c = cache_dir();
        if !c.join(".complete").exists() {
            eprintln!(
                "fixture trees missing in {}; running build-trees.sh",
                c.display()
            );
            Run::new(repo_root().join("tests/fixtures/build-trees.sh"))
                .timeout(Duration::from_secs(1800))
                .ok();
        }
        Trees {
            v1: c.join("v1"),
            v2: c.join("v2"),
            v3: c.join("v3"),
        }
    })
}

/// The synthetic pair (s1, s2) from tests/fixtures/synthetic.sh, cached
/// under the fixture cache keyed by the script's digest; built atomically
/// (to a temporary directory, then renamed) so concurrent test processes
/// never see a half-built pair.
pub fn synthetic() -> &'static (PathBuf, PathBuf) {
    static S: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let script = repo_root().join("tests/fixtures/synthetic.sh");
        let digest = hex_of(&sha2::Sha256::digest(
            std::fs::read(&script).expect("read synthetic.sh"),
        ))[..16]
            .to_string();
        let base = cache_dir();
        std::fs::create_dir_all(&base).expect("create fixture cache");
        let dir = base.join(format!("synthetic-{digest}"));
        if !dir.join("s2").exists() {
            let tmp = base.join(format!("synthetic-{digest}.tmp.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&tmp);
            Run::new(&script).arg(&tmp).ok();
            if std::fs::rename(&tmp, &dir).is_err() {
                // Another process won the race; its pair is identical.
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        (dir.join("s1"), dir.join("s2"))
    })
}

/// Lowercase hex of B.
pub fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// This process's scratch directory, under the target dir (same filesystem
/// as the fixture cache on CI machines, so copies are cheap). Scratch left
/// behind by earlier test processes that have died is removed (after lazily
/// unmounting anything still mounted below it).
pub fn scratch_base() -> &'static Path {
    static B: OnceLock<PathBuf> = OnceLock::new();
    B.get_or_init(|| {
        let top = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&top).expect("create CARGO_TARGET_TMPDIR");
        if let Ok(rd) = std::fs::read_dir(&top) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("imageupd-test-") {
                    if !Path::new("/proc").join(pid).exists() {
                        for m in mounts_under(&e.path()).into_iter().rev() {
                            let _ = Command::new("umount").arg("-l").arg(&m).status();
                        }
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let b = top.join(format!("imageupd-test-{}", std::process::id()));
        std::fs::create_dir_all(&b).expect("create scratch base");
        b
    })
}

/// A fresh scratch directory, removed when dropped (kept when
/// IMAGEUPD_TEST_KEEP is set, for debugging).
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl Scratch {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("IMAGEUPD_TEST_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping scratch {}", d.keep().display());
            }
        }
    }
}

/// A new scratch directory whose name starts with `name`.
pub fn scratch(name: &str) -> Scratch {
    let d = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(scratch_base())
        .expect("create scratch dir");
    let path = d.path().to_path_buf();
    Scratch { dir: Some(d), path }
}

/// `cp -a SRC DST` (DST must not exist).
#[track_caller]
pub fn copy_tree(src: &Path, dst: &Path) {
    assert!(!dst.exists(), "copy_tree: {} already exists", dst.display());
    cmd("cp", [OsStr::new("-a"), src.as_os_str(), dst.as_os_str()]);
}

/// Make DST an exact copy of SRC again: `rsync -aHAX --delete --numeric-ids`.
/// Never uses imageupd.
#[track_caller]
pub fn reset_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("create reset target");
    let mut s = src.as_os_str().to_owned();
    s.push("/");
    let mut d = dst.as_os_str().to_owned();
    d.push("/");
    cmd(
        "rsync",
        [
            OsStr::new("-aHAX"),
            OsStr::new("--delete"),
            OsStr::new("--numeric-ids"),
            &s,
            &d,
        ],
    );
}

/// The source tree of a fixture image id.
pub fn fixture_tree(id: &str) -> PathBuf {
    match id {
        "v1" | "v2" | "v3" => trees().get(id).to_path_buf(),
        "s1" => synthetic().0.clone(),
        "s2" => synthetic().1.clone(),
        _ => panic!("unknown fixture image {id}"),
    }
}
