//! Helpers for the agent and TripleO tests: the PyPI venv with the real
//! os-collect-config / os-apply-config / os-refresh-config, and a node whose
//! root is a loop-mounted ext4 filesystem adopted at image v1.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

/// The venv with os-collect-config, os-apply-config and os-refresh-config
/// 14.1.0 (.ci/run creates it): `$IMAGEUPD_TEST_VENV`, default
/// /opt/imageupd-venv.
pub fn venv() -> PathBuf {
    let v = std::env::var_os("IMAGEUPD_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/opt/imageupd-venv".into());
    for tool in [
        "os-collect-config",
        "os-apply-config",
        "os-refresh-config",
        "dib-run-parts",
    ] {
        assert!(
            v.join("bin").join(tool).is_file(),
            "{} has no bin/{tool}: create it with `python3 -m venv {0} && {0}/bin/pip install os-collect-config==14.1.0 os-apply-config==14.1.0 os-refresh-config==14.1.0` (as .ci/run does), or point IMAGEUPD_TEST_VENV at one",
            v.display()
        );
    }
    v
}

/// PATH with the venv's tools and the imageupd binary first.
pub fn tool_path() -> String {
    let bin_dir = Path::new(bin()).parent().expect("binary dir").to_path_buf();
    format!(
        "{}:{}:{}",
        venv().join("bin").display(),
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A node: an ext4 loop filesystem (mounted read-only) at image v1, trusting
/// the shared store's key, with `config` as its config.toml.
pub struct TestNode {
    /// Scratch space; `marks/` in it is outside the root, for hooks' logs.
    pub s: Scratch,
    /// The filesystem.
    pub fs: LoopFs,
    /// Its mount point: the root.
    pub root: PathBuf,
    /// The shared store.
    pub store: PathBuf,
    /// Where hooks leave marks.
    pub marks: PathBuf,
}

impl TestNode {
    /// A node named `name`; `config` goes to etc/imageupd/config.toml. Images
    /// v1 and v2 (and v3 when `with_v3`) are published.
    pub fn new(name: &str, config: &str, with_v3: bool) -> TestNode {
        let store = shared_store();
        let v1 = store.image("v1");
        store.image("v2");
        if with_v3 {
            store.image("v3");
        }
        let s = scratch(name);
        let fs = LoopFs::create(s.path(), 768, Some(&v1), false);
        let root = fs.mnt.clone();
        trust(&root, &store.key);
        write_config(&root, config);
        let t = Instant::now();
        apply(&store.dir, "v1", &root, &[]).expect_ok();
        eprintln!("adopted v1 in {:.1?}", t.elapsed());
        assert_eq!(image_id(&root).as_deref(), Some("v1"));
        fs.remount(true);
        let marks = s.join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        TestNode {
            s,
            fs,
            root,
            store: store.dir.clone(),
            marks,
        }
    }

    /// Change files in the (read-only) root: remount rw, run `f`, remount ro.
    pub fn edit(&self, f: impl FnOnce(&Path)) {
        self.fs.remount(false);
        f(&self.root);
        self.fs.remount(true);
    }

    /// Write a hook script into the root.
    pub fn hook(&self, phase: &str, name: &str, body: &str) {
        self.edit(|r| {
            write_script(
                &r.join("etc/imageupd/hooks")
                    .join(format!("{phase}.d"))
                    .join(name),
                body,
            )
        });
    }

    /// `imageupd status --json --root ROOT`.
    pub fn status(&self) -> serde_json::Value {
        imageupd(["status", "--json", "--root"])
            .arg(&self.root)
            .ok()
            .json()
    }
}

/// Poll `f` every 100 ms until it returns Some or `limit` passes.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if t.elapsed() > limit {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Write `text` to `path` atomically (temp file + rename), as
/// os-collect-config does.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
