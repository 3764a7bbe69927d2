//! The publisher side of deltas: `publish --parent P` (or, without it, the
//! store's newest related image P) writes `images/<id>/deltas/<P>.delta`
//! ([`build`]).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use liblzma::stream::{Check, Filters, LzmaOptions, Stream, PRESET_EXTREME};
use serde::Serialize;

use crate::format::codec::CHILD_FRAME_LEVEL;
use crate::format::delta::{
    patch_encode, Header, Kind, Object, DELTAS_DIR, DELTA_SUFFIX, PATCH_MAX_BYTES, PAYLOAD_DICT_MAX,
};
use crate::format::manifest::{Digest, FileType, Manifest, RelPath, MAX_MANIFEST_BYTES};
use crate::format::mframes::{encode_reusing, Unframed};
use crate::format::stream::VerifyReader;
use crate::fs::store::Store;

/// zstd level of the manifest patch and of object patches.
pub const PATCH_LEVEL: i32 = 19;
/// xz preset of the payload (level 9, extreme).
pub const PAYLOAD_PRESET: u32 = 9 | PRESET_EXTREME;
/// A patch is used only when it is smaller than the object divided by this.
pub const PATCH_MIN_GAIN: u64 = 2;

/// What building a delta did (`publish --json` → `delta`).
#[derive(Serialize, Debug, Default, Clone)]
pub struct DeltaReport {
    /// The image the delta applies to.
    pub from: String,
    /// Bytes of the delta file.
    pub bytes: u64,
    /// Objects in its payload.
    pub objects: usize,
    /// Of those, objects sent as patches against the parent's file.
    pub patched_objects: usize,
    /// Bytes of the manifest patch.
    pub manifest_patch_bytes: u64,
    /// Bytes of the compressed payload.
    pub payload_bytes: u64,
    /// Bytes of the decompressed payload.
    pub payload_raw_bytes: u64,
    /// Wall time in ms.
    pub ms: u64,
}

/// A patch reference: the parent's digest, size and path of a file.
type Reference = (Digest, u64, RelPath);

/// Decompressed JSON of a stored manifest (bounded).
pub(super) fn manifest_json(stored: &[u8]) -> Result<Vec<u8>> {
    let mut json = Vec::new();
    zstd::stream::read::Decoder::new(stored)?
        .take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut json)
        .context("decompressing a manifest")?;
    if json.len() as u64 > MAX_MANIFEST_BYTES {
        bail!("manifest exceeds {MAX_MANIFEST_BYTES} bytes");
    }
    Ok(json)
}

/// An object's content from the store, verified.
fn read_object(st: &Store, d: &Digest, size: u64) -> Result<Vec<u8>> {
    let mut v = Vec::with_capacity(size as usize);
    let mut r = VerifyReader::new(st.open_object(d)?.take(size + 1));
    r.read_to_end(&mut v)?;
    r.finish(d, size)??;
    Ok(v)
}

/// Write `images/<m.id>/deltas/<parent>.delta` for image `m` (stored
/// manifest bytes `stored`, signature `sig`), whose objects are in the
/// store already; `threads` patches are computed at once.
pub fn build(
    st: &Store,
    m: &Manifest,
    stored: &[u8],
    sig: Option<&[u8]>,
    parent: &str,
    threads: usize,
) -> Result<DeltaReport> {
    let t0 = Instant::now();
    let (p_stored, _) = st.read_manifest_raw(parent)?;
    let p_frames = Unframed::new(&p_stored, MAX_MANIFEST_BYTES).context("the parent's manifest")?;
    let p_json = &p_frames.json;
    let pm = Manifest::parse(p_json).context("parsing the parent's manifest")?;
    let json = manifest_json(stored)?;
    // A node rebuilds the stored bytes from the JSON and the parent's
    // frames; a manifest it cannot rebuild would make the delta useless.
    let (rebuilt, _) = encode_reusing(&json, CHILD_FRAME_LEVEL, &p_frames.by_piece())?;
    if rebuilt != stored {
        bail!(
            "the manifest of {:?} is not framed against its parent {parent:?}",
            m.id
        );
    }
    let todo = new_objects(m, &pm);
    let coded = patches(st, &todo, threads)?;
    let objects: Vec<Object> = todo
        .iter()
        .zip(&coded)
        .map(|((d, size, _), (kind, _))| Object {
            digest: *d,
            size: *size,
            kind: kind.clone(),
        })
        .collect();
    let raw_len: u64 = objects.iter().map(Object::raw_len).sum();
    let (mut payload, payload_len) = payload(st, &objects, &coded, raw_len)?;
    let mpatch = patch_encode(p_json, &json, PATCH_LEVEL).context("patching the manifest")?;
    let h = Header {
        from: parent.to_string(),
        from_sha256: Digest::of(&p_stored),
        to: m.id.clone(),
        to_sha256: Digest::of(stored),
        sig: sig.map(<[u8]>::to_vec),
        frame_level: CHILD_FRAME_LEVEL,
        manifest_len: json.len() as u64,
        mpatch_len: mpatch.len() as u64,
        payload_len,
        objects,
    };
    let bytes = write_delta(st, &m.id, parent, &h, &mpatch, &mut payload)?;
    Ok(DeltaReport {
        from: parent.to_string(),
        bytes,
        objects: h.objects.len(),
        patched_objects: h
            .objects
            .iter()
            .filter(|o| matches!(o.kind, Kind::Patch { .. }))
            .count(),
        manifest_patch_bytes: h.mpatch_len,
        payload_bytes: payload_len,
        payload_raw_bytes: raw_len,
        ms: t0.elapsed().as_millis() as u64,
    })
}

/// The target's new objects in manifest order, each with the parent's
/// version of its (first) path, when that can serve as a patch reference.
fn new_objects(m: &Manifest, pm: &Manifest) -> Vec<(Digest, u64, Option<Reference>)> {
    let old_digests: HashSet<Digest> = pm.entries.iter().filter_map(|e| e.sha256).collect();
    let old_files: HashMap<&RelPath, (Digest, u64)> = pm
        .entries
        .iter()
        .filter(|e| e.ftype == FileType::File && e.size > 0)
        .filter_map(|e| e.sha256.map(|d| (&e.path, (d, e.size))))
        .collect();
    let mut seen = HashSet::new();
    let mut todo: Vec<(Digest, u64, Option<Reference>)> = Vec::new();
    for e in &m.entries {
        let Some(d) = e.sha256 else { continue };
        if e.ftype != FileType::File || e.size == 0 || old_digests.contains(&d) || !seen.insert(d) {
            continue;
        }
        let reference = old_files
            .get(&e.path)
            .filter(|(_, os)| *os <= PATCH_MAX_BYTES && e.size <= PATCH_MAX_BYTES)
            .map(|(od, os)| (*od, *os, e.path.clone()));
        todo.push((d, e.size, reference));
    }
    todo
}

/// Patches (in parallel): kept only when they pay.
fn patches(
    st: &Store,
    todo: &[(Digest, u64, Option<Reference>)],
    threads: usize,
) -> Result<Vec<(Kind, Option<Vec<u8>>)>> {
    crate::sys::par::par_map(todo, threads.max(1), |(d, size, reference)| {
        let Some((od, os, path)) = reference else {
            return Ok((Kind::Full, None));
        };
        let old = read_object(st, od, *os).with_context(|| format!("reading object {od}"))?;
        let new = read_object(st, d, *size).with_context(|| format!("reading object {d}"))?;
        let p = patch_encode(&old, &new, PATCH_LEVEL).context("computing a patch")?;
        if (p.len() as u64).saturating_mul(PATCH_MIN_GAIN) < *size {
            let kind = Kind::Patch {
                from: *od,
                from_size: *os,
                path: path.clone(),
                len: p.len() as u64,
            };
            Ok((kind, Some(p)))
        } else {
            Ok((Kind::Full, None))
        }
    })
}

/// The payload: one xz stream into a scratch file, rewound; and its length.
fn payload(
    st: &Store,
    objects: &[Object],
    coded: &[(Kind, Option<Vec<u8>>)],
    raw_len: u64,
) -> Result<(fs::File, u64)> {
    let tmp = tempfile::tempfile_in(st.tmp_dir()?).context("creating a scratch file")?;
    let mut opts = LzmaOptions::new_preset(PAYLOAD_PRESET)?;
    opts.dict_size((raw_len.max(4096)).min(u64::from(PAYLOAD_DICT_MAX)) as u32);
    let mut filters = Filters::new();
    filters.x86().lzma2(&opts);
    let stream = Stream::new_stream_encoder(&filters, Check::None)?;
    let mut xz = liblzma::write::XzEncoder::new_stream(BufWriter::new(tmp), stream);
    for (o, (_, patch)) in objects.iter().zip(coded) {
        match patch {
            Some(p) => xz.write_all(p)?,
            None => {
                let mut r = VerifyReader::new(st.open_object(&o.digest)?.take(o.size + 1));
                io::copy(&mut r, &mut xz)
                    .with_context(|| format!("compressing object {}", o.digest))?;
                r.finish(&o.digest, o.size)??;
            }
        }
    }
    let mut payload = xz
        .finish()
        .context("compressing the delta payload")?
        .into_inner()
        .map_err(|e| e.into_error())?;
    let payload_len = payload.seek(SeekFrom::End(0))?;
    payload.seek(SeekFrom::Start(0))?;
    Ok((payload, payload_len))
}

/// Write the delta file (header, manifest patch, payload) under a temporary
/// name, check its length, and rename it into place; its size in bytes.
fn write_delta(
    st: &Store,
    id: &str,
    parent: &str,
    h: &Header,
    mpatch: &[u8],
    payload: &mut fs::File,
) -> Result<u64> {
    let head = h.encode();
    let dir = st.image_dir(id).join(DELTAS_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{parent}{DELTA_SUFFIX}"));
    let mut out = tempfile::NamedTempFile::new_in(&dir).context("creating the delta file")?;
    {
        let mut w = BufWriter::new(out.as_file_mut());
        w.write_all(&head)?;
        w.write_all(mpatch)?;
        io::copy(payload, &mut w)?;
        w.flush()?;
    }
    out.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))?;
    out.as_file().sync_all()?;
    let bytes = out.as_file().metadata()?.len();
    if bytes != h.file_len(head.len()) {
        bail!(
            "delta file is {bytes} bytes, expected {}",
            h.file_len(head.len())
        );
    }
    out.persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests;
