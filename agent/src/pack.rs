//! Packs: an update in a few round trips from a fully static store.
//!
//! Loose objects (`objects/<aa>/<sha256>`) cost one HTTP request each, and
//! a package update touches thousands of files. So `publish` also writes:
//!
//! ```text
//! STORE/packs/<sha256>.pack              the image's new objects' zstd frames, back to back
//! STORE/images/<id>/packs.idx.zst        where each object of the image sits: (pack, offset, length)
//! STORE/images/<id>/packs.idx.zst.sig    ed25519 signature over packs.idx.zst (same key as the manifest)
//! ```
//!
//! - A pack holds exactly the bytes of the loose object files it covers
//!   (each a complete zstd frame), in manifest order, at most
//!   [`PACK_MAX_BYTES`] per pack; packs are named by their sha256 and
//!   immutable. Objects already in the parent image's packs are not packed
//!   again, so the objects an update from the parent needs are contiguous in
//!   the new image's packs.
//! - The index lists, for every distinct non-empty file digest of the
//!   manifest in order of first appearance ([`object_order`]), its pack,
//!   offset and length; digests are not repeated (the signed manifest has
//!   them), which keeps the index at a few bytes per object. It names the
//!   sha256 of the manifest it belongs to, and is signed.
//! - A client turns the objects it needs into byte ranges of packs, merges
//!   ranges whose gap is at most [`COALESCE_GAP`] ([`plan_spans`]), fetches
//!   each span with one `Range` request (any static server, CDN or bucket
//!   answers those), cuts the body at object boundaries and verifies every
//!   object against its digest, exactly as a loose object. Objects no pack
//!   covers, and stores without packs, are fetched loose; loose objects stay
//!   in the store for older clients.
//!
//! Index encoding (then zstd): magic [`MAGIC`], manifest sha256 (32 bytes),
//! varint pack count, per pack its sha256 (32 bytes) and varint size, varint
//! object count, per object varint pack number, zigzag varint of (offset −
//! end of the previous object in the same pack), varint length.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use sha2::Digest as _;

use crate::manifest::{Digest, FileType, Manifest};
use crate::store::{self, Store};

/// Directory of packs inside a store.
pub const PACKS_DIR: &str = "packs";
/// File name of an image's pack index inside `images/<id>/`.
pub const INDEX_NAME: &str = "packs.idx.zst";
/// File name of the pack index's signature inside `images/<id>/`.
pub const INDEX_SIG_NAME: &str = "packs.idx.zst.sig";
/// Largest pack file written, in bytes (an object larger than this gets a
/// pack of its own).
pub const PACK_MAX_BYTES: u64 = 64 << 20;
/// Ranges of one pack closer than this many bytes are fetched with one
/// request (the gap is downloaded and discarded): about what one round trip
/// costs on a 100 Mbit/s link with 20 ms latency.
pub const COALESCE_GAP: u64 = 256 * 1024;
/// Spans are cut at object boundaries to about the bytes to fetch divided
/// by the parallel downloads, but never below this many bytes.
pub const MIN_SPAN_BYTES: u64 = 1 << 20;
/// First bytes of a decompressed pack index.
pub const MAGIC: &[u8; 8] = b"IUPKIDX1";
/// zstd level of the pack index.
const INDEX_LEVEL: i32 = 19;
/// Largest decompressed pack index accepted, in bytes.
const MAX_INDEX_BYTES: u64 = 256 << 20;

/// Relative path of a pack in the store.
pub fn pack_rel(d: &Digest) -> String {
    format!("{PACKS_DIR}/{}.pack", d.to_hex())
}

/// The objects of a manifest in index order: each distinct non-empty
/// regular file digest once, in order of first appearance, with its content
/// size in bytes.
pub fn object_order(m: &Manifest) -> Vec<(Digest, u64)> {
    let mut seen = std::collections::HashSet::new();
    m.entries
        .iter()
        .filter(|e| e.ftype == FileType::File && e.size > 0)
        .filter_map(|e| e.sha256.map(|d| (d, e.size)))
        .filter(|(d, _)| seen.insert(*d))
        .collect()
}

/// A pack named by an index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackRef {
    /// sha256 of the pack file (its name).
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// Where one object sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Index into [`PackIndex::packs`].
    pub pack: u32,
    /// Byte offset of its zstd frame in the pack.
    pub offset: u64,
    /// Length of the frame in bytes.
    pub len: u64,
}

/// A decoded pack index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackIndex {
    /// sha256 of the stored manifest (`manifest.json.zst`) it belongs to.
    pub manifest_sha256: Digest,
    /// The packs it refers to.
    pub packs: Vec<PackRef>,
    /// One location per object, in [`object_order`].
    pub locs: Vec<Loc>,
}

/// An object located in a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// The pack.
    pub pack: PackRef,
    /// Byte offset of the frame in the pack.
    pub offset: u64,
    /// Frame length in bytes.
    pub len: u64,
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(b: &[u8], pos: &mut usize) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b
            .get(*pos)
            .ok_or_else(|| anyhow!("pack index is truncated"))?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("pack index has an overlong number")
}

fn get_digest(b: &[u8], pos: &mut usize) -> Result<Digest> {
    let s = b
        .get(*pos..*pos + 32)
        .ok_or_else(|| anyhow!("pack index is truncated"))?;
    *pos += 32;
    Ok(Digest(s.try_into().unwrap_or([0; 32])))
}

fn zigzag(v: i128) -> u64 {
    (if v < 0 { ((-v) << 1) - 1 } else { v << 1 }) as u64
}

fn unzigzag(v: u64) -> i128 {
    if v & 1 == 1 {
        -(i128::from(v >> 1)) - 1
    } else {
        i128::from(v >> 1)
    }
}

impl PackIndex {
    /// The stored (zstd-compressed) form.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut b = Vec::with_capacity(64 + self.locs.len() * 5);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&self.manifest_sha256.0);
        put_varint(&mut b, self.packs.len() as u64);
        for p in &self.packs {
            b.extend_from_slice(&p.digest.0);
            put_varint(&mut b, p.size);
        }
        put_varint(&mut b, self.locs.len() as u64);
        let mut ends = vec![0u64; self.packs.len()];
        for l in &self.locs {
            let end = ends
                .get_mut(l.pack as usize)
                .ok_or_else(|| anyhow!("pack number {} out of range", l.pack))?;
            put_varint(&mut b, u64::from(l.pack));
            put_varint(&mut b, zigzag(i128::from(l.offset) - i128::from(*end)));
            put_varint(&mut b, l.len);
            *end = l.offset + l.len;
        }
        zstd::encode_all(&b[..], INDEX_LEVEL).context("compressing the pack index")
    }

    /// Parse the stored form (after its signature has been checked); every
    /// location must lie inside its pack.
    pub fn decode(stored: &[u8]) -> Result<PackIndex> {
        let mut b = Vec::new();
        zstd::stream::read::Decoder::new(stored)
            .context("pack index is not a zstd stream")?
            .take(MAX_INDEX_BYTES + 1)
            .read_to_end(&mut b)
            .context("decompressing the pack index")?;
        if b.len() as u64 > MAX_INDEX_BYTES {
            bail!("pack index exceeds {MAX_INDEX_BYTES} bytes");
        }
        if !b.starts_with(MAGIC) {
            bail!("not a pack index of this format (magic {MAGIC:?} expected)");
        }
        let mut pos = MAGIC.len();
        let manifest_sha256 = get_digest(&b, &mut pos)?;
        let n = get_varint(&b, &mut pos)?;
        if n > (b.len() / 33) as u64 {
            bail!("pack index claims {n} packs");
        }
        let mut packs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let digest = get_digest(&b, &mut pos)?;
            let size = get_varint(&b, &mut pos)?;
            packs.push(PackRef { digest, size });
        }
        let n = get_varint(&b, &mut pos)?;
        if n > (b.len() / 3) as u64 {
            bail!("pack index claims {n} objects");
        }
        let mut ends = vec![0u64; packs.len()];
        let mut locs = Vec::with_capacity(n as usize);
        for i in 0..n {
            let pack = get_varint(&b, &mut pos)?;
            let rel = unzigzag(get_varint(&b, &mut pos)?);
            let len = get_varint(&b, &mut pos)?;
            let p = packs
                .get(pack as usize)
                .ok_or_else(|| anyhow!("object {i}: pack number {pack} out of range"))?;
            let offset = u64::try_from(i128::from(ends[pack as usize]) + rel)
                .map_err(|_| anyhow!("object {i}: negative offset"))?;
            if len == 0 || offset.checked_add(len).is_none_or(|e| e > p.size) {
                bail!(
                    "object {i}: bytes {offset}+{len} lie outside pack {}",
                    p.digest
                );
            }
            ends[pack as usize] = offset + len;
            locs.push(Loc {
                pack: pack as u32,
                offset,
                len,
            });
        }
        if pos != b.len() {
            bail!("pack index has {} trailing bytes", b.len() - pos);
        }
        Ok(PackIndex {
            manifest_sha256,
            packs,
            locs,
        })
    }

    /// Digest → location, given the manifest's [`object_order`]; the index
    /// must belong to that manifest.
    pub fn locate(
        &self,
        manifest_sha256: &Digest,
        order: &[(Digest, u64)],
    ) -> Result<HashMap<Digest, Located>> {
        if &self.manifest_sha256 != manifest_sha256 {
            bail!(
                "pack index belongs to manifest {}, not {manifest_sha256}",
                self.manifest_sha256
            );
        }
        if self.locs.len() != order.len() {
            bail!(
                "pack index lists {} objects but the manifest has {}",
                self.locs.len(),
                order.len()
            );
        }
        Ok(order
            .iter()
            .zip(&self.locs)
            .map(|((d, _), l)| {
                (
                    *d,
                    Located {
                        pack: self.packs[l.pack as usize],
                        offset: l.offset,
                        len: l.len,
                    },
                )
            })
            .collect())
    }
}

/// One object a client wants from a pack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// The object's digest.
    pub digest: Digest,
    /// Its content size in bytes.
    pub size: u64,
    /// Frame offset in the pack, bytes.
    pub offset: u64,
    /// Frame length, bytes.
    pub len: u64,
}

/// One range request: bytes `start..end` of a pack and the objects in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// The pack.
    pub pack: PackRef,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The objects, by offset.
    pub objects: Vec<Want>,
}

/// Group wanted objects into spans: per pack by offset, merging neighbours
/// whose gap is at most `gap` bytes while a span stays below `target`
/// bytes.
pub fn plan_spans(mut wants: Vec<(PackRef, Want)>, gap: u64, target: u64) -> Vec<Span> {
    wants.sort_by_key(|(p, w)| (p.digest, w.offset));
    wants.dedup_by_key(|(p, w)| (p.digest, w.offset));
    let mut out: Vec<Span> = Vec::new();
    for (p, w) in wants {
        if let Some(s) = out.last_mut() {
            if s.pack.digest == p.digest
                && w.offset >= s.end
                && w.offset - s.end <= gap
                && s.end - s.start < target
            {
                s.end = w.offset + w.len;
                s.objects.push(w);
                continue;
            }
        }
        out.push(Span {
            pack: p,
            start: w.offset,
            end: w.offset + w.len,
            objects: vec![w],
        });
    }
    out
}

/// What building packs did.
#[derive(Serialize, Debug, Default, Clone)]
pub struct PackReport {
    /// Packs newly written.
    pub new_packs: usize,
    /// Bytes of the new packs.
    pub new_pack_bytes: u64,
    /// Objects placed in new packs.
    pub packed_objects: usize,
    /// Objects found in the parent's packs.
    pub reused_objects: usize,
    /// Size of the stored pack index, bytes.
    pub index_bytes: u64,
}

/// Locations of the parent's objects, when it has a pack index.
fn parent_locations(st: &Store, parent: &str) -> Result<HashMap<Digest, Located>> {
    let dir = st.image_dir(parent);
    let stored = match fs::read(dir.join(INDEX_NAME)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e).context("reading the parent's pack index"),
    };
    let (m_stored, _) = st.read_manifest_raw(parent)?;
    let m = store::decode_manifest(&m_stored)?;
    let idx = PackIndex::decode(&stored).context("the parent's pack index")?;
    let mut map = idx.locate(&Digest::of(&m_stored), &object_order(&m))?;
    // Only packs still present are reused.
    map.retain(|_, l| st.path().join(pack_rel(&l.pack.digest)).is_file());
    Ok(map)
}

/// A pack being written to scratch space.
struct PackWriter {
    tmp: tempfile::NamedTempFile,
    hasher: sha2::Sha256,
    size: u64,
}

impl PackWriter {
    fn new(st: &Store) -> Result<PackWriter> {
        Ok(PackWriter {
            tmp: tempfile::NamedTempFile::new_in(st.tmp_dir()?).context("creating a pack")?,
            hasher: sha2::Sha256::new(),
            size: 0,
        })
    }

    fn append(&mut self, frame: &[u8]) -> Result<u64> {
        let off = self.size;
        self.tmp.write_all(frame).context("writing a pack")?;
        self.hasher.update(frame);
        self.size += frame.len() as u64;
        Ok(off)
    }

    fn finish(self, st: &Store) -> Result<PackRef> {
        let digest = Digest(self.hasher.finalize().into());
        let dir = st.path().join(PACKS_DIR);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let f = self.tmp.as_file();
        f.sync_all()?;
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        let dst = st.path().join(pack_rel(&digest));
        self.tmp
            .persist(&dst)
            .with_context(|| format!("storing pack {}", dst.display()))?;
        Ok(PackRef {
            digest,
            size: self.size,
        })
    }
}

/// Write the packs and the index of manifest `m` (stored bytes
/// `m_stored`): objects in the parent's packs are referenced there, the rest
/// are copied from their loose files into new packs. Returns the stored
/// index.
pub fn build(
    st: &Store,
    m: &Manifest,
    m_stored: &[u8],
    parent: Option<&str>,
) -> Result<(Vec<u8>, PackReport)> {
    let order = object_order(m);
    let known = match parent {
        Some(p) => parent_locations(st, p)
            .with_context(|| format!("reading the packs of parent image {p:?}"))?,
        None => HashMap::new(),
    };
    let mut report = PackReport::default();
    let mut placed: Vec<(PackRef, u64, u64)> = Vec::with_capacity(order.len());
    // Objects of the current (unfinished) pack: positions in `placed`.
    let mut pending: Vec<usize> = Vec::new();
    let mut w: Option<PackWriter> = None;
    let mut frame = Vec::new();
    let placeholder = PackRef {
        digest: Digest([0; 32]),
        size: 0,
    };
    for (d, _) in &order {
        if let Some(l) = known.get(d) {
            placed.push((l.pack, l.offset, l.len));
            report.reused_objects += 1;
            continue;
        }
        frame.clear();
        let p = st.object_path(d);
        File::open(&p)
            .and_then(|mut f| f.read_to_end(&mut frame))
            .with_context(|| format!("reading object {}", p.display()))?;
        if let Some(cur) = &w {
            if cur.size > 0 && cur.size + frame.len() as u64 > PACK_MAX_BYTES {
                let done = w.take().map(|x| x.finish(st)).transpose()?;
                fill(&mut placed, &mut pending, done, &mut report);
            }
        }
        let cur = match &mut w {
            Some(c) => c,
            None => w.insert(PackWriter::new(st)?),
        };
        let off = cur.append(&frame)?;
        pending.push(placed.len());
        placed.push((placeholder, off, frame.len() as u64));
        report.packed_objects += 1;
    }
    let done = w.take().map(|x| x.finish(st)).transpose()?;
    fill(&mut placed, &mut pending, done, &mut report);
    // Number the packs in order of first use.
    let mut packs: Vec<PackRef> = Vec::new();
    let mut num: HashMap<Digest, u32> = HashMap::new();
    let locs = placed
        .iter()
        .map(|(p, offset, len)| {
            let n = *num.entry(p.digest).or_insert_with(|| {
                packs.push(*p);
                (packs.len() - 1) as u32
            });
            Loc {
                pack: n,
                offset: *offset,
                len: *len,
            }
        })
        .collect();
    let idx = PackIndex {
        manifest_sha256: Digest::of(m_stored),
        packs,
        locs,
    };
    let stored = idx.encode()?;
    report.index_bytes = stored.len() as u64;
    Ok((stored, report))
}

fn fill(
    placed: &mut [(PackRef, u64, u64)],
    pending: &mut Vec<usize>,
    done: Option<PackRef>,
    report: &mut PackReport,
) {
    if let Some(p) = done {
        for i in pending.drain(..) {
            placed[i].0 = p;
        }
        report.new_packs += 1;
        report.new_pack_bytes += p.size;
    }
}

/// Write an image's pack index (and signature) into `images/<id>/`, before
/// its manifest publishes the image.
pub fn put_index(st: &Store, id: &str, stored: &[u8], sig: Option<&[u8]>) -> Result<()> {
    let dir = st.image_dir(id);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(s) = sig {
        store::write_atomic(&dir.join(INDEX_SIG_NAME), s)?;
    }
    store::write_atomic(&dir.join(INDEX_NAME), stored)
}

/// True when every object of image `id` is where its pack index says
/// (publisher-side check, used by tests and `publish`).
pub fn check_store(st: &Store, id: &str) -> Result<usize> {
    let (m_stored, _) = st.read_manifest_raw(id)?;
    let m = store::decode_manifest(&m_stored)?;
    let stored = fs::read(st.image_dir(id).join(INDEX_NAME)).context("reading the pack index")?;
    let idx = PackIndex::decode(&stored)?;
    let order = object_order(&m);
    let map = idx.locate(&Digest::of(&m_stored), &order)?;
    for (d, _) in &order {
        let l = map[d];
        let mut f = File::open(st.path().join(pack_rel(&l.pack.digest)))?;
        let mut frame = vec![0u8; l.len as usize];
        std::io::Seek::seek(&mut f, io::SeekFrom::Start(l.offset))?;
        f.read_exact(&mut frame)?;
        let loose = fs::read(st.object_path(d))?;
        if frame != loose {
            bail!(
                "object {d} in pack {} differs from its loose copy",
                l.pack.digest
            );
        }
    }
    Ok(order.len())
}

/// Whether a store directory has packs for image `id`.
pub fn has_index(store: &Path, id: &str) -> bool {
    store.join("images").join(id).join(INDEX_NAME).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    #[test]
    fn varints_and_zigzag_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            let mut pos = 0;
            assert_eq!(get_varint(&b, &mut pos).expect("varint"), v);
            assert_eq!(pos, b.len());
        }
        for v in [0i128, 1, -1, 1000, -1000, i128::from(u32::MAX)] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
        assert!(get_varint(&[0x80], &mut 0).is_err());
    }

    #[test]
    fn index_round_trips_and_rejects_bad_locations() {
        let idx = PackIndex {
            manifest_sha256: d(9),
            packs: vec![
                PackRef {
                    digest: d(1),
                    size: 100,
                },
                PackRef {
                    digest: d(2),
                    size: 50,
                },
            ],
            locs: vec![
                Loc {
                    pack: 0,
                    offset: 0,
                    len: 10,
                },
                Loc {
                    pack: 1,
                    offset: 20,
                    len: 30,
                },
                Loc {
                    pack: 0,
                    offset: 10,
                    len: 90,
                },
                Loc {
                    pack: 0,
                    offset: 5,
                    len: 5,
                },
            ],
        };
        let enc = idx.encode().expect("encode");
        assert_eq!(PackIndex::decode(&enc).expect("decode"), idx);
        let order: Vec<(Digest, u64)> = (10..14).map(|n| (d(n), 1)).collect();
        let map = idx.locate(&d(9), &order).expect("locate");
        assert_eq!(map[&d(11)].pack.digest, d(2));
        assert_eq!(map[&d(11)].offset, 20);
        assert!(idx.locate(&d(8), &order).is_err(), "other manifest");
        assert!(idx.locate(&d(9), &order[..3]).is_err(), "other count");
        let mut bad = idx.clone();
        bad.locs[1].len = 31;
        assert!(PackIndex::decode(&bad.encode().expect("encode")).is_err());
        assert!(PackIndex::decode(b"not zstd").is_err());
    }

    #[test]
    fn spans_merge_small_gaps_and_split_at_target() {
        let p = PackRef {
            digest: d(1),
            size: 1 << 30,
        };
        let q = PackRef {
            digest: d(2),
            size: 1 << 30,
        };
        let w = |n: u8, offset: u64, len: u64| Want {
            digest: d(n),
            size: len,
            offset,
            len,
        };
        let spans = plan_spans(
            vec![
                (p, w(3, 1000, 100)),
                (p, w(1, 0, 100)),
                (p, w(2, 200, 100)),
                (p, w(4, 1_000_000, 10)),
                (q, w(5, 0, 10)),
                (p, w(1, 0, 100)),
            ],
            1000,
            1 << 20,
        );
        let shape: Vec<(Digest, u64, u64, usize)> = spans
            .iter()
            .map(|s| (s.pack.digest, s.start, s.end, s.objects.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (d(1), 0, 1100, 3),
                (d(1), 1_000_000, 1_000_010, 1),
                (d(2), 0, 10, 1)
            ]
        );
        // A small target cuts one contiguous run into several spans.
        let run: Vec<(PackRef, Want)> = (0..10)
            .map(|i| (p, w(i, u64::from(i) * 100, 100)))
            .collect();
        assert_eq!(plan_spans(run, 0, 300).len(), 4);
    }
}
