//! Entry points of the fuzz targets (`fuzz/`, cargo-fuzz) and of their
//! corpus replay in plain `cargo test` (`tests/fuzz_corpus.rs`): each takes
//! untrusted bytes, runs the pure parser that meets them first, and must
//! return (any `Err` is fine) without panicking, hanging or allocating
//! without bound. No I/O.
//!
//! | target          | parser                                                   |
//! |-----------------|----------------------------------------------------------|
//! | `manifest`      | [`Manifest::parse`] (JSON), then `validate`, `to_json`   |
//! | `pack_index`    | [`PackIndex::decode`] (zstd), then `locate`              |
//! | `delta`         | [`Header::head_len`], [`Header::parse`], then the payload |
//! | `delta_payload` | [`Payload`] of a fixed header (full and patch objects)  |
//! | `mframes`       | the frame list (JSON) and [`mframes::Unframed::new`]     |
//! | `metadata`      | the metadata documents: merge, `lookup`, `wanted`        |
//! | `config`        | [`Config::merge_str`] (TOML)                             |
//! | `serve_request` | `serve`'s request target and `Range` header parsing     |

use std::path::Path;

use crate::agent::metadata::{self, Snapshot};
use crate::engine::config::Config;
use crate::format::delta::{Header, Kind, Object, Payload};
use crate::format::manifest::{Digest, Manifest, RelPath};
use crate::format::mframes;
use crate::format::pack::PackIndex;
use crate::publish::serve::request;

/// A fuzz target: its name and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// The targets, by name (as in `fuzz/fuzz_targets/<name>.rs` and
/// `fuzz/corpus/<name>/`).
pub const TARGETS: &[Target] = &[
    ("manifest", manifest),
    ("pack_index", pack_index),
    ("delta", delta),
    ("delta_payload", delta_payload),
    ("mframes", frames),
    ("metadata", metadata_docs),
    ("config", config),
    ("serve_request", serve_request),
];

/// Run target `name` on `data`; false when there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match TARGETS.iter().find(|(n, _)| *n == name) {
        Some((_, f)) => {
            f(data);
            true
        }
        None => false,
    }
}

/// A manifest's JSON.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = Manifest::parse(data) {
        // A parsed manifest must survive its own checks and a round trip.
        let ok = m.validate().is_ok();
        let again = Manifest::parse(&m.to_json()).expect("a parsed manifest re-parses");
        assert_eq!(again.validate().is_ok(), ok);
    }
}

/// A stored pack index (zstd).
pub fn pack_index(data: &[u8]) {
    if let Ok(idx) = PackIndex::decode(data) {
        let order: Vec<(Digest, u64)> = idx
            .locs
            .iter()
            .enumerate()
            .map(|(i, _)| (Digest::of(&i.to_le_bytes()), i as u64))
            .collect();
        let _ = idx.locate(&idx.manifest_sha256, &order);
    }
}

/// A delta file: header, then its payload against empty references.
pub fn delta(data: &[u8]) {
    if Header::head_len(data).is_err() {
        return;
    }
    let Ok((h, at)) = Header::parse(data) else {
        return;
    };
    let _ = h.encode();
    let start = at.saturating_add(h.mpatch_len as usize).min(data.len());
    drain_payload(&h.objects, &data[start..]);
}

/// A payload (xz) for a fixed list of objects: one full object of 1000
/// bytes, one patch of 64 bytes against a 16-byte reference.
pub fn delta_payload(data: &[u8]) {
    let objects = [
        Object {
            digest: Digest::of(b"full"),
            size: 1000,
            kind: Kind::Full,
        },
        Object {
            digest: Digest::of(b"patched"),
            size: 4096,
            kind: Kind::Patch {
                from: Digest::of(&[0u8; 16]),
                from_size: 16,
                path: RelPath(b"etc/x".to_vec()),
                len: 64,
            },
        },
    ];
    drain_payload(&objects, data);
}

fn drain_payload(objects: &[Object], payload: &[u8]) {
    let Ok(mut p) = Payload::new(payload) else {
        return;
    };
    let reference = [0u8; 16];
    for o in objects {
        let r = match o.kind {
            Kind::Full => p.object(o, None, &mut std::io::sink()),
            Kind::Patch { .. } => p.object(o, Some(&reference), &mut std::io::sink()),
        };
        if r.is_err() {
            return;
        }
    }
    let _ = p.finish();
}

/// A frame list (JSON) and a stored manifest cut into frames.
pub fn frames(data: &[u8]) {
    if let Ok(l) = serde_json::from_slice::<mframes::FrameList>(data) {
        let _ = mframes::check_list(&l);
    }
    if let Ok(u) = mframes::Unframed::new(data, 64 << 20) {
        let _ = mframes::encode_reusing(&u.json, 1, &u.by_piece());
    }
    let _ = mframes::known_frames(&[data.to_vec()]);
}

/// Metadata documents (JSON, as os-collect-config caches them), one per
/// NUL-separated part, merged; then the image id and source looked up.
pub fn metadata_docs(data: &[u8]) {
    let docs: Vec<serde_json::Value> = data
        .split(|b| *b == 0)
        .filter_map(|d| serde_json::from_slice(d).ok())
        .collect();
    let snap = Snapshot {
        doc: metadata::merge_all(&docs),
        files: Vec::new(),
        changed_at: None,
    };
    let _ = snap.wanted("image_id", "image_source");
    let _ = snap.wanted("a.b.0.id", "deploy.source");
    let _ = metadata::render_raw(&snap.doc);
}

/// A configuration fragment (TOML).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut c = Config::default();
    let _ = c.merge_str(text, Path::new("fuzz.toml"));
}

/// `serve`'s request target and `Range` header value: the first line is
/// the target, the rest the header (the file length from its byte count).
pub fn serve_request(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (target, range) = text.split_once('\n').unwrap_or((&text, ""));
    let _ = request::resolve_path(target);
    for len in [0, 1, data.len() as u64, u64::MAX] {
        if let request::RangeSpec::Part { start, end } = request::parse_range(range, len) {
            assert!(start <= end && end < len, "range {start}-{end} of {len}");
        }
    }
}
