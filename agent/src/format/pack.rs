//! Packs: an update in a few round trips from a fully static store.
//!
//! Loose objects (`objects/<aa>/<sha256>`) cost one HTTP request each, and
//! a package update touches thousands of files. So `publish` also writes:
//!
//! ```text
//! STORE/packs/<sha256>.pack              zstd frames of the image's new objects, back to back
//! STORE/images/<id>/packs.idx.zst        where each object of the image sits
//! STORE/images/<id>/packs.idx.zst.sig    ed25519 signature over packs.idx.zst (same key as the manifest)
//! ```
//!
//! - A pack is a sequence of zstd frames, at most [`PACK_MAX_BYTES`] per
//!   pack, named by its sha256 and immutable. An object larger than
//!   [`SOLID_MAX_OBJECT`] is a frame of its own, byte for byte its loose
//!   object file; smaller ones are concatenated in manifest order into
//!   *solid blocks* of at most [`BLOCK_MAX_BYTES`] (uncompressed), one frame
//!   each, so that small files compress against each other as in a tarball.
//!   Objects already in the parent image's packs are not packed again, so
//!   the objects an update from the parent needs are contiguous in the new
//!   image's packs ([`crate::publish::pack`]).
//! - The index lists, for every distinct non-empty file digest of the
//!   manifest in order of first appearance ([`object_order`]), its pack, the
//!   offset and length of its frame, and for a block member its offset in
//!   the decompressed block; digests are not repeated (the signed manifest
//!   has them), which keeps the index at a few bytes per object. It names
//!   the sha256 of the manifest it belongs to, and is signed.
//! - A client turns the objects it needs into frames of packs, merges
//!   frames whose gap is at most [`COALESCE_GAP`] into spans
//!   ([`plan_spans`]), fetches each span with one `Range` request (any
//!   static server, CDN or bucket answers those), cuts the body at frame
//!   boundaries (decompressing a block, bounded by [`BLOCK_MAX_BYTES`], to
//!   cut out its objects) and verifies every object against its digest,
//!   exactly as a loose object. Objects no pack covers, and stores without
//!   packs, are fetched loose; loose objects stay in the store for older
//!   clients.
//!
//! Index encoding (then zstd): magic [`MAGIC`], manifest sha256 (32 bytes),
//! varint pack count, per pack its sha256 (32 bytes) and varint size, varint
//! object count, then per object: varint pack number, varint kind, and
//! - kind 0 (a frame of its own): zigzag varint of (frame offset − end of
//!   the previous frame of that pack), varint frame length;
//! - kind 1 (first member of a block): the same, then varint offset in the
//!   block;
//! - kind 2 (in the same block as the previous object of that pack): varint
//!   offset in the block.

use std::collections::HashMap;
use std::io::Read;

use anyhow::{anyhow, bail, Context, Result};

use crate::format::manifest::{Digest, FileType, Manifest};

/// Directory of packs inside a store.
pub const PACKS_DIR: &str = "packs";
/// File name of an image's pack index inside `images/<id>/`.
pub const INDEX_NAME: &str = "packs.idx.zst";
/// File name of the pack index's signature inside `images/<id>/`.
pub const INDEX_SIG_NAME: &str = "packs.idx.zst.sig";
/// Largest pack file written, in bytes (an object larger than this gets a
/// pack of its own).
pub const PACK_MAX_BYTES: u64 = 64 << 20;
/// Objects up to this many bytes go into solid blocks.
pub const SOLID_MAX_OBJECT: u64 = 1 << 20;
/// Uncompressed bytes of a solid block at most (the decompression bound
/// clients enforce).
pub const BLOCK_MAX_BYTES: u64 = 4 << 20;
/// Frames of one pack closer than this many bytes are fetched with one
/// request (the gap is downloaded and discarded): about what one round trip
/// costs on a 100 Mbit/s link with 20 ms latency.
pub const COALESCE_GAP: u64 = 256 * 1024;
/// Spans are cut at frame boundaries to about the bytes to fetch divided by
/// the parallel downloads, but never below this many bytes.
pub const MIN_SPAN_BYTES: u64 = 1 << 20;
/// First bytes of a decompressed pack index.
pub const MAGIC: &[u8; 8] = b"IUPKIDX2";
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
    /// Offset of the content in the decompressed block, in bytes; `None`
    /// when the frame is the object alone.
    pub inner: Option<u64>,
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
    /// Offset in the decompressed block, bytes; `None` for a frame of its own.
    pub inner: Option<u64>,
}

fn put_varint(out: &mut Vec<u8>, v: u64) {
    crate::format::varint::put(out, v);
}

fn get_varint(b: &[u8], pos: &mut usize) -> Result<u64> {
    crate::format::varint::get(b, pos).map_err(|e| anyhow!("pack index: {e}"))
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
        // Per pack: the previous frame (offset, length).
        let mut prev = vec![None::<(u64, u64)>; self.packs.len()];
        for l in &self.locs {
            let p = prev
                .get_mut(l.pack as usize)
                .ok_or_else(|| anyhow!("pack number {} out of range", l.pack))?;
            put_varint(&mut b, u64::from(l.pack));
            match l.inner {
                Some(inner) if *p == Some((l.offset, l.len)) => {
                    put_varint(&mut b, 2);
                    put_varint(&mut b, inner);
                }
                _ => {
                    let end = p.map_or(0, |(o, n)| o + n);
                    put_varint(&mut b, u64::from(l.inner.is_some()));
                    put_varint(&mut b, zigzag(i128::from(l.offset) - i128::from(end)));
                    put_varint(&mut b, l.len);
                    if let Some(inner) = l.inner {
                        put_varint(&mut b, inner);
                    }
                }
            }
            *p = Some((l.offset, l.len));
        }
        zstd::encode_all(&b[..], INDEX_LEVEL).context("compressing the pack index")
    }

    /// Parse the stored form (after its signature has been checked); every
    /// frame must lie inside its pack.
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
        let mut prev = vec![None::<(u64, u64)>; packs.len()];
        let mut locs = Vec::with_capacity(n as usize);
        for i in 0..n {
            let pack = get_varint(&b, &mut pos)?;
            let p = packs
                .get(pack as usize)
                .ok_or_else(|| anyhow!("object {i}: pack number {pack} out of range"))?;
            let pv = &mut prev[pack as usize];
            let (offset, len, inner) = match get_varint(&b, &mut pos)? {
                2 => {
                    let (o, n) =
                        pv.ok_or_else(|| anyhow!("object {i}: no earlier block in its pack"))?;
                    (o, n, Some(get_varint(&b, &mut pos)?))
                }
                k @ (0 | 1) => {
                    let end = pv.map_or(0, |(o, n)| o + n);
                    let rel = unzigzag(get_varint(&b, &mut pos)?);
                    let offset = u64::try_from(i128::from(end) + rel)
                        .map_err(|_| anyhow!("object {i}: negative offset"))?;
                    let len = get_varint(&b, &mut pos)?;
                    let inner = if k == 1 {
                        Some(get_varint(&b, &mut pos)?)
                    } else {
                        None
                    };
                    (offset, len, inner)
                }
                k => bail!("object {i}: unknown kind {k}"),
            };
            if len == 0 || offset.checked_add(len).is_none_or(|e| e > p.size) {
                bail!(
                    "object {i}: bytes {offset}+{len} lie outside pack {}",
                    p.digest
                );
            }
            if inner.is_some_and(|x| x >= BLOCK_MAX_BYTES) {
                bail!("object {i}: offset in its block beyond {BLOCK_MAX_BYTES} bytes");
            }
            *pv = Some((offset, len));
            locs.push(Loc {
                pack: pack as u32,
                offset,
                len,
                inner,
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
                        inner: l.inner,
                    },
                )
            })
            .collect())
    }
}

/// One object wanted out of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// The object's digest.
    pub digest: Digest,
    /// Its content size in bytes.
    pub size: u64,
    /// Offset in the decompressed block, bytes; `None` for a frame of its own.
    pub inner: Option<u64>,
}

/// One frame a client wants, with the objects it wants from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// Frame offset in the pack, bytes.
    pub offset: u64,
    /// Frame length, bytes.
    pub len: u64,
    /// The objects, by offset in the block.
    pub parts: Vec<Part>,
}

/// One range request: bytes `start..end` of a pack and the frames in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    /// The pack.
    pub pack: PackRef,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// The frames, by offset.
    pub frames: Vec<Want>,
}

/// Group wanted objects (location, digest, content size in bytes) into
/// spans: per pack by offset, objects of one frame together, merging
/// neighbouring frames whose gap is at most `gap` bytes while a span stays
/// below `target` bytes.
pub fn plan_spans(wants: &[(Located, Digest, u64)], gap: u64, target: u64) -> Vec<Span> {
    let mut frames: std::collections::BTreeMap<(Digest, u64), (PackRef, Want)> =
        std::collections::BTreeMap::new();
    for (l, d, size) in wants {
        let (_, w) = frames.entry((l.pack.digest, l.offset)).or_insert((
            l.pack,
            Want {
                offset: l.offset,
                len: l.len,
                parts: Vec::new(),
            },
        ));
        if !w.parts.iter().any(|p| p.digest == *d) {
            w.parts.push(Part {
                digest: *d,
                size: *size,
                inner: l.inner,
            });
        }
    }
    let mut out: Vec<Span> = Vec::new();
    for (_, (p, mut w)) in frames {
        w.parts.sort_by_key(|p| p.inner);
        if let Some(s) = out.last_mut() {
            if s.pack.digest == p.digest
                && w.offset >= s.end
                && w.offset - s.end <= gap
                && s.end - s.start < target
            {
                s.end = w.offset + w.len;
                s.frames.push(w);
                continue;
            }
        }
        out.push(Span {
            pack: p,
            start: w.offset,
            end: w.offset + w.len,
            frames: vec![w],
        });
    }
    out
}

/// Bytes a loose request is assumed to cost besides its body (the request
/// and the response's headers), when a block's frame is weighed against
/// fetching its wanted objects loose ([`split_blocks`]).
pub const REQUEST_OVERHEAD_BYTES: u64 = 600;
/// A small object compressed alone (its loose frame) is assumed this many
/// times (numerator / denominator) the share of its block's frame that its
/// size makes up: without its neighbours as context it compresses worse.
pub const LOOSE_PENALTY: (u64, u64) = (3, 2);

/// Split the wanted objects (location, digest, content size in bytes) into
/// those worth taking from their packs and those cheaper loose: a solid
/// block whose wanted objects are a small part of it (a node one release
/// behind, an image published without `--parent`) would be downloaded
/// whole for a few kilobytes of them. Its objects go loose when their
/// estimated loose frames plus [`REQUEST_OVERHEAD_BYTES`] each come to less
/// than the block's frame. `block_bytes` gives a block's decompressed size
/// (the end of its last object the index locates), keyed by pack digest and
/// frame offset; the estimate of an object's loose frame is its share of
/// the block's frame times [`LOOSE_PENALTY`]. Frames of one object are
/// always taken from the pack (they are the loose frame).
#[allow(clippy::type_complexity)]
pub fn split_blocks(
    wants: Vec<(Located, Digest, u64)>,
    block_bytes: &HashMap<(Digest, u64), u64>,
) -> (Vec<(Located, Digest, u64)>, Vec<(Digest, u64)>) {
    let mut wanted: HashMap<(Digest, u64), (u64, u64)> = HashMap::new();
    for (l, _, size) in &wants {
        if l.inner.is_some() {
            let w = wanted.entry((l.pack.digest, l.offset)).or_default();
            w.0 += size;
            w.1 += 1;
        }
    }
    let (num, den) = LOOSE_PENALTY;
    let loose_pays = |l: &Located| {
        let key = (l.pack.digest, l.offset);
        let (Some(&(bytes, count)), Some(&content)) = (wanted.get(&key), block_bytes.get(&key))
        else {
            return false;
        };
        if content == 0 {
            return false;
        }
        let body = (u128::from(bytes) * u128::from(l.len) * u128::from(num))
            / (u128::from(content) * u128::from(den));
        body + u128::from(count) * u128::from(REQUEST_OVERHEAD_BYTES) < u128::from(l.len)
    };
    let mut keep = Vec::with_capacity(wants.len());
    let mut loose = Vec::new();
    for w in wants {
        if w.0.inner.is_some() && loose_pays(&w.0) {
            loose.push((w.1, w.2));
        } else {
            keep.push(w);
        }
    }
    (keep, loose)
}

/// The decompressed size of every solid block that `map` locates objects
/// in (as far as they show: the end of the last one), keyed as
/// [`split_blocks`] wants; `sizes` gives each object's content size.
pub fn block_bytes<'a>(
    map: &HashMap<Digest, Located>,
    sizes: impl IntoIterator<Item = &'a (Digest, u64)>,
) -> HashMap<(Digest, u64), u64> {
    let mut out: HashMap<(Digest, u64), u64> = HashMap::new();
    for (d, size) in sizes {
        if let Some(l) = map.get(d) {
            if let Some(inner) = l.inner {
                let end = out.entry((l.pack.digest, l.offset)).or_default();
                *end = (*end).max(inner + size);
            }
        }
    }
    out
}

/// Whether a store directory has packs for image `id`.
pub fn has_index(store: &std::path::Path, id: &str) -> bool {
    store.join("images").join(id).join(INDEX_NAME).is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest([n; 32])
    }

    fn loc(pack: u32, offset: u64, len: u64, inner: Option<u64>) -> Loc {
        Loc {
            pack,
            offset,
            len,
            inner,
        }
    }

    #[test]
    fn a_block_whose_wanted_objects_are_a_small_part_goes_loose() {
        let pack = PackRef {
            digest: d(1),
            size: 10 << 20,
        };
        let at = |offset: u64, len: u64, inner: Option<u64>| Located {
            pack,
            offset,
            len,
            inner,
        };
        // Block A: 4 MiB of content in a 1 MiB frame; 8 KiB of it wanted.
        // Block B: the same frame size, nearly all of it wanted.
        // Block C: tiny (600 bytes of frame): one request costs more.
        let a = at(0, 1 << 20, Some(0));
        let b = at(1 << 20, 1 << 20, Some(0));
        let c = at(2 << 20, 600, Some(0));
        let own = at(3 << 20, 5 << 20, None);
        let map: HashMap<Digest, Located> = [
            (d(10), a),
            (
                d(11),
                Located {
                    inner: Some(4 << 20),
                    ..a
                },
            ),
            (d(20), b),
            (d(30), c),
            (d(40), own),
        ]
        .into_iter()
        .collect();
        let sizes = [
            (d(10), 8 << 10),
            (d(11), 0),
            (d(20), 4 << 20),
            (d(30), 2000),
            (d(40), 9 << 20),
        ];
        let blocks = block_bytes(&map, &sizes);
        assert_eq!(blocks[&(d(1), 0)], 4 << 20);
        assert_eq!(blocks[&(d(1), 1 << 20)], 4 << 20);
        assert!(
            !blocks.contains_key(&(d(1), 3 << 20)),
            "a frame of its own is no block"
        );
        let wants = vec![
            (a, d(10), 8 << 10),
            (b, d(20), 4 << 20),
            (c, d(30), 2000),
            (own, d(40), 9 << 20),
        ];
        let (keep, loose) = split_blocks(wants, &blocks);
        assert_eq!(loose, vec![(d(10), 8 << 10)]);
        let kept: Vec<Digest> = keep.iter().map(|w| w.1).collect();
        assert_eq!(kept, vec![d(20), d(30), d(40)]);
        // Many wanted objects of block A: the requests outweigh the frame.
        let many: Vec<(Located, Digest, u64)> = (0..2000u32)
            .map(|i| {
                (
                    Located {
                        inner: Some(u64::from(i) * 2),
                        ..a
                    },
                    d(10),
                    2,
                )
            })
            .collect();
        let (keep, loose) = split_blocks(many, &blocks);
        assert!(loose.is_empty() && keep.len() == 2000);
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
        let pr = |n: u8, size: u64| PackRef { digest: d(n), size };
        let idx = PackIndex {
            manifest_sha256: d(9),
            packs: vec![pr(1, 100), pr(2, 50)],
            locs: vec![
                loc(0, 0, 10, None),
                loc(1, 20, 30, Some(0)),
                loc(0, 10, 90, Some(0)),
                loc(1, 20, 30, Some(7)),
                loc(0, 10, 90, Some(5)),
                loc(0, 5, 5, None),
            ],
        };
        let enc = idx.encode().expect("encode");
        assert_eq!(PackIndex::decode(&enc).expect("decode"), idx);
        let order: Vec<(Digest, u64)> = (10..16).map(|n| (d(n), 1)).collect();
        let map = idx.locate(&d(9), &order).expect("locate");
        assert_eq!(map[&d(11)].pack.digest, d(2));
        assert_eq!(map[&d(13)].inner, Some(7));
        assert_eq!(map[&d(14)].offset, 10);
        assert!(idx.locate(&d(8), &order).is_err(), "other manifest");
        assert!(idx.locate(&d(9), &order[..3]).is_err(), "other count");
        let mut bad = idx.clone();
        bad.locs[1].len = 31;
        assert!(PackIndex::decode(&bad.encode().expect("encode")).is_err());
        let mut bad = idx.clone();
        bad.locs[1].inner = Some(BLOCK_MAX_BYTES);
        assert!(PackIndex::decode(&bad.encode().expect("encode")).is_err());
        assert!(PackIndex::decode(b"not zstd").is_err());
    }

    #[test]
    fn spans_merge_small_gaps_group_blocks_and_split_at_target() {
        let p = PackRef {
            digest: d(1),
            size: 1 << 30,
        };
        let q = PackRef {
            digest: d(2),
            size: 1 << 30,
        };
        let at = |pack: PackRef, offset: u64, len: u64, inner: Option<u64>| Located {
            pack,
            offset,
            len,
            inner,
        };
        let spans = plan_spans(
            &[
                (at(p, 1000, 100, None), d(3), 100),
                (at(p, 0, 100, Some(50)), d(1), 10),
                (at(p, 0, 100, Some(0)), d(6), 10),
                (at(p, 200, 100, None), d(2), 100),
                (at(p, 1_000_000, 10, None), d(4), 10),
                (at(q, 0, 10, None), d(5), 10),
                (at(p, 0, 100, Some(50)), d(1), 10),
            ],
            1000,
            1 << 20,
        );
        let shape: Vec<(Digest, u64, u64, usize)> = spans
            .iter()
            .map(|s| (s.pack.digest, s.start, s.end, s.frames.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                (d(1), 0, 1100, 3),
                (d(1), 1_000_000, 1_000_010, 1),
                (d(2), 0, 10, 1)
            ]
        );
        let block = &spans[0].frames[0];
        assert_eq!(
            block.parts.iter().map(|p| p.digest).collect::<Vec<_>>(),
            vec![d(6), d(1)],
            "one frame, its objects once each, by offset"
        );
        // A small target cuts one contiguous run into several spans.
        let run: Vec<(Located, Digest, u64)> = (0..10)
            .map(|i| (at(p, u64::from(i) * 100, 100, None), d(i), 100))
            .collect();
        assert_eq!(plan_spans(&run, 0, 300).len(), 4);
    }
}
