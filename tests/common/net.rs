//! Helpers of the network tests (tests/net.rs, tests/net_faults.rs): the
//! objects an update needs, a store as an older publisher wrote it, `apply
//! --from URL` and its `download` report.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::*;

/// Digests of every non-empty file of image ID.
pub fn digests(store: &Path, id: &str) -> HashSet<String> {
    let m = read_manifest(store, id);
    m["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["type"] == "file" && e["size"].as_u64().unwrap_or(0) > 0)
        .filter_map(|e| e["sha256"].as_str().map(str::to_string))
        .collect()
}

/// The largest stored object that image `to` needs and image `from` lacks.
pub fn largest_new_object(store: &Path, from: &str, to: &str) -> (String, u64) {
    let old = digests(store, from);
    digests(store, to)
        .difference(&old)
        .map(|d| {
            (
                d.clone(),
                std::fs::metadata(object_path(store, d))
                    .expect("object")
                    .len(),
            )
        })
        .max_by_key(|(_, len)| *len)
        .expect("v2 has new objects")
}

/// A private copy of the shared store (hard links; change files only by
/// replacing them) without pack indexes, manifest frame lists and update
/// deltas, as an older publisher wrote it: manifests are fetched whole and
/// objects loose, one request each (packs and frames are tested in
/// tests/net_disk.rs, deltas in tests/delta.rs).
pub fn store_copy(dst: &Path) -> PathBuf {
    let store = shared_store();
    store.image("v1");
    store.image("v2");
    cmd(
        "cp",
        [OsStr::new("-al"), store.dir.as_os_str(), dst.as_os_str()],
    );
    for id in ["v1", "v2"] {
        for f in ["packs.idx.zst", "manifest.frames.json"] {
            let _ = std::fs::remove_file(dst.join("images").join(id).join(f));
        }
    }
    hide_deltas(dst);
    dst.to_path_buf()
}

/// `imageupd apply --from URL --id v2 --root ROOT --json` + EXTRA.
pub fn apply_url(url: &str, root: &Path, extra: &[&str]) -> Out {
    imageupd(["apply", "--from", url, "--id", "v2", "--root"])
        .arg(root)
        .arg("--json")
        .args(extra)
        .run()
}

/// Check the `download` block of `apply --json`.
#[track_caller]
pub fn download_report(out: &Out) -> serde_json::Value {
    let d = out.json()["download"].clone();
    assert!(
        d.is_object(),
        "apply --json from a URL has no \"download\" block\n{}",
        out.describe()
    );
    for k in [
        "requests",
        "retries",
        "bytes",
        "objects",
        "cached_objects",
        "resumed",
    ] {
        assert!(d[k].is_u64(), "download.{k} missing\n{}", out.describe());
    }
    d
}

/// The download cache is gone after a committed update (it is dropped once
/// staging is done).
#[track_caller]
pub fn assert_no_cache(root: &Path) {
    let c = root.join("var/lib/imageupd/cache");
    assert!(
        !c.exists(),
        "the download cache {} is still there after the commit",
        c.display()
    );
}
