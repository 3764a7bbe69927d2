//! Keys, trust and config on a node, publishing, the store shared by the
//! tests of one binary and private copies of it, and reading a store.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::*;

/// A signing key pair made by `imageupd keygen`.
#[derive(Clone)]
pub struct Key {
    pub secret: PathBuf,
    pub public: PathBuf,
}

/// `imageupd keygen --out DIR/NAME`.
#[track_caller]
pub fn keygen(dir: &Path, name: &str) -> Key {
    std::fs::create_dir_all(dir).expect("create key dir");
    let secret = dir.join(name);
    imageupd([
        OsStr::new("keygen"),
        OsStr::new("--out"),
        secret.as_os_str(),
    ])
    .ok();
    let mut public = secret.as_os_str().to_owned();
    public.push(".pub");
    let public = PathBuf::from(public);
    assert!(
        public.is_file(),
        "keygen did not write {}",
        public.display()
    );
    let mode = std::fs::metadata(&secret)
        .expect("secret key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(
        mode,
        0o600,
        "secret key {} must be mode 0600",
        secret.display()
    );
    Key { secret, public }
}

/// Trust KEY on the node ROOT: copy KEY.pub into ROOT/etc/imageupd/trusted.d/.
pub fn trust(root: &Path, key: &Key) {
    let d = root.join("etc/imageupd/trusted.d");
    std::fs::create_dir_all(&d).expect("create trusted.d");
    let name = key.public.file_name().expect("key file name");
    std::fs::copy(&key.public, d.join(name)).expect("copy public key");
}

/// Write ROOT/etc/imageupd/config.toml.
pub fn write_config(root: &Path, toml: &str) {
    let d = root.join("etc/imageupd");
    std::fs::create_dir_all(&d).expect("create etc/imageupd");
    std::fs::write(d.join("config.toml"), toml).expect("write config.toml");
}

/// The channel the test kit publishes image ID on: one per fixture id, so
/// that the many tests which move a root between fixtures in any order
/// (v2 -> v1, s2 -> s1) are never downgrades. Downgrade protection itself
/// is tested in tests/trust.rs with its own store on one channel.
pub fn fixture_channel(id: &str) -> String {
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("fixture-{safe}")
}

/// `imageupd publish --store STORE --id ID --channel fixture-ID [--key K] [--parent P] --level 3 SOURCE`.
#[track_caller]
pub fn publish(
    store: &Path,
    id: &str,
    key: Option<&Key>,
    parent: Option<&str>,
    source: &Path,
) -> Out {
    let mut r = imageupd(["publish", "--store"])
        .arg(store)
        .args(["--id", id, "--level", LEVEL, "--channel"])
        .arg(fixture_channel(id));
    if let Some(k) = key {
        r = r.arg("--key").arg(&k.secret);
    }
    if let Some(p) = parent {
        r = r.args(["--parent", p]);
    }
    r.arg(source).ok()
}

/// A store shared by all tests of one test binary: a private copy of the
/// build's cached v1, v2, v3 store ([`super::store_cache`]); other images
/// are published (signed, level 3) the first time a test asks for them.
pub struct SharedStore {
    pub dir: PathBuf,
    pub key: Key,
    published: Mutex<BTreeSet<String>>,
}

impl SharedStore {
    /// Make sure image ID (v1, v2, v3, s1 or s2) is in the store; returns
    /// the tree it was published from.
    #[track_caller]
    pub fn image(&self, id: &str) -> PathBuf {
        let mut done = self.published.lock().unwrap_or_else(|e| e.into_inner());
        self.publish_locked(id, &mut done)
    }

    #[track_caller]
    fn publish_locked(&self, id: &str, done: &mut BTreeSet<String>) -> PathBuf {
        let src = fixture_tree(id);
        if !done.contains(id) {
            // v2 and v3 are published as successors of v1, s2 of s1; a
            // parent must be in the store first.
            let parent = match id {
                "v2" | "v3" => Some("v1"),
                "s2" => Some("s1"),
                _ => None,
            };
            if let Some(p) = parent {
                self.publish_locked(p, done);
            }
            let t = Instant::now();
            publish(&self.dir, id, Some(&self.key), parent, &src);
            eprintln!("published {id} in {:.1?}", t.elapsed());
            done.insert(id.to_string());
        }
        src
    }
}

/// This test binary's shared store.
pub fn shared_store() -> &'static SharedStore {
    static S: OnceLock<SharedStore> = OnceLock::new();
    S.get_or_init(|| {
        let base = scratch_base().join("shared");
        std::fs::create_dir_all(&base).expect("create shared dir");
        let key = super::store_cache::seed(&base);
        let published = super::store_cache::CACHED
            .iter()
            .map(|(id, _)| id.to_string())
            .collect();
        SharedStore {
            dir: base.join("store"),
            key,
            published: Mutex::new(published),
        }
    })
}

/// Object path in a store for a sha256 hex digest.
pub fn object_path(store: &Path, sha256: &str) -> PathBuf {
    store.join("objects").join(&sha256[..2]).join(sha256)
}

/// Read and decompress STORE/images/ID/manifest.json.zst.
pub fn read_manifest(store: &Path, id: &str) -> serde_json::Value {
    let p = store.join("images").join(id).join("manifest.json.zst");
    let raw = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let json =
        zstd::decode_all(&raw[..]).unwrap_or_else(|e| panic!("{} is not zstd: {e}", p.display()));
    serde_json::from_slice(&json).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

/// A manifest entry's path as bytes (string or {"hex": ...}).
pub fn entry_path(e: &serde_json::Value) -> Vec<u8> {
    match &e["path"] {
        serde_json::Value::String(s) => s.as_bytes().to_vec(),
        v => {
            let h = v["hex"]
                .as_str()
                .unwrap_or_else(|| panic!("bad entry path {v}"));
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).expect("hex"))
                .collect()
        }
    }
}

/// Remove the update deltas (`images/*/deltas/`) from STORE, a private
/// (hard-linked) copy: nodes then update through packs, loose objects and
/// manifest frames, as from a store published without `--parent`.
pub fn hide_deltas(store: &Path) {
    let Ok(images) = std::fs::read_dir(store.join("images")) else {
        return;
    };
    for e in images.flatten() {
        let d = e.path().join("deltas");
        if d.is_dir() {
            std::fs::remove_dir_all(&d)
                .unwrap_or_else(|err| panic!("removing {}: {err}", d.display()));
        }
    }
}

/// A hard-linked copy of the shared store at DST without update deltas
/// (see [`hide_deltas`]), holding at least images v1, v2 and v3.
pub fn shared_store_without_deltas(dst: &Path) -> PathBuf {
    let store = shared_store();
    for id in ["v1", "v2", "v3"] {
        store.image(id);
    }
    cmd(
        "cp",
        [OsStr::new("-al"), store.dir.as_os_str(), dst.as_os_str()],
    );
    hide_deltas(dst);
    dst.to_path_buf()
}
