//! The publisher side of packs: writing them and the image's index.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::PermissionsExt;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::Digest as _;

use crate::format::manifest::{Digest, Manifest};
use crate::format::pack::{
    object_order, pack_rel, Loc, Located, PackIndex, PackRef, BLOCK_MAX_BYTES, INDEX_NAME,
    INDEX_SIG_NAME, PACKS_DIR, PACK_MAX_BYTES, SOLID_MAX_OBJECT,
};
use crate::fs::store::{self, Store};

/// What building packs did.
#[derive(Serialize, Debug, Default, Clone)]
pub struct PackReport {
    /// Packs newly written.
    pub new_packs: usize,
    /// Bytes of the new packs.
    pub new_pack_bytes: u64,
    /// Objects placed in new packs.
    pub packed_objects: usize,
    /// Of those, objects in solid blocks.
    pub block_objects: usize,
    /// Solid blocks written.
    pub blocks: usize,
    /// Objects found in the packs of the parent (or of the store's recent
    /// images, without one).
    pub reused_objects: usize,
    /// The images whose packs were reused.
    pub reused_from: Vec<String>,
    /// Of the reused objects, those the first of `reused_from` has.
    pub shared_with_first: usize,
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
    let m = crate::format::codec::decode_manifest(&m_stored)?;
    let idx = match PackIndex::decode(&stored) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!("not reusing the packs of {parent:?}: {e:#}");
            return Ok(HashMap::new());
        }
    };
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

/// Objects placed so far: (pack, frame offset, frame length, offset in block).
type Placed = Vec<(Option<PackRef>, u64, u64, Option<u64>)>;

/// Packs being written: frames go to the current pack, which is closed when
/// the next frame would make it larger than [`PACK_MAX_BYTES`].
struct Packer<'a> {
    st: &'a Store,
    cur: Option<PackWriter>,
    /// Positions in `placed` of the current pack's objects.
    pending: Vec<usize>,
    placed: Placed,
    report: PackReport,
}

impl Packer<'_> {
    /// Append a frame holding the objects at `members` (positions in
    /// `placed`, with their offsets in the block).
    fn frame(&mut self, frame: &[u8], members: &[(usize, Option<u64>)]) -> Result<()> {
        if let Some(c) = &self.cur {
            if c.size > 0 && c.size + frame.len() as u64 > PACK_MAX_BYTES {
                self.close()?;
            }
        }
        let cur = match &mut self.cur {
            Some(c) => c,
            None => self.cur.insert(PackWriter::new(self.st)?),
        };
        let off = cur.append(frame)?;
        for &(i, inner) in members {
            self.placed[i] = (None, off, frame.len() as u64, inner);
            self.pending.push(i);
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if let Some(w) = self.cur.take() {
            let p = w.finish(self.st)?;
            for i in self.pending.drain(..) {
                self.placed[i].0 = Some(p);
            }
            self.report.new_packs += 1;
            self.report.new_pack_bytes += p.size;
        }
        Ok(())
    }
}

/// Compress a solid block (content size known up front).
fn block_frame(buf: &[u8], level: i32) -> Result<Vec<u8>> {
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), level)?;
    enc.include_checksum(false)?;
    enc.set_pledged_src_size(Some(buf.len() as u64))?;
    enc.write_all(buf)?;
    enc.finish().context("compressing a solid block")
}

/// Without `--parent`, a new image reuses the packs of this many of the
/// store's most recently published images.
pub const REUSE_RECENT: usize = 3;

/// The images whose packs a new image `id` reuses: its parent alone (so
/// what an update from the parent needs is contiguous in the new packs),
/// else the [`REUSE_RECENT`] most recently published images of the store,
/// newest first. Without them, an image published as builds come (no
/// `--parent`) would pack every object again, and a node on an earlier
/// image would find each changed object inside a solid block of unchanged
/// ones, downloading the whole block.
pub fn reuse_from(st: &Store, id: &str, parent: Option<&str>) -> Result<Vec<String>> {
    if let Some(p) = parent {
        return Ok(vec![p.to_string()]);
    }
    let idx = st.index()?;
    Ok(idx
        .images
        .iter()
        .rev()
        .filter(|e| e.id != id)
        .take(REUSE_RECENT)
        .map(|e| e.id.clone())
        .collect())
}

/// Write the packs and the index of manifest `m` (stored bytes
/// `m_stored`): objects in the packs of the images `reuse` (see
/// [`reuse_from`]; the first that has an object wins) are referenced
/// there; of the rest, large ones are copied from their loose files, small
/// ones decompressed and recompressed at `level` in solid blocks. Returns
/// the stored index.
pub fn build(
    st: &Store,
    m: &Manifest,
    m_stored: &[u8],
    reuse: &[String],
    level: i32,
) -> Result<(Vec<u8>, PackReport)> {
    let order = object_order(m);
    let mut known: HashMap<Digest, Located> = HashMap::new();
    let mut first: Option<std::collections::HashSet<Digest>> = None;
    for p in reuse {
        // A recent image whose packs do not read is only not reused.
        match parent_locations(st, p) {
            Ok(locs) => {
                if first.is_none() {
                    first = Some(locs.keys().copied().collect());
                }
                for (d, l) in locs {
                    known.entry(d).or_insert(l);
                }
            }
            Err(e) => tracing::warn!("not reusing the packs of image {p:?}: {e:#}"),
        }
        first.get_or_insert_with(Default::default);
    }
    let mut pk = Packer {
        st,
        cur: None,
        pending: Vec::new(),
        placed: vec![(None, 0, 0, None); order.len()],
        report: PackReport {
            reused_from: reuse.to_vec(),
            ..PackReport::default()
        },
    };
    let mut block: Vec<u8> = Vec::new();
    let mut members: Vec<(usize, Option<u64>)> = Vec::new();
    let mut frame = Vec::new();
    for (i, (d, size)) in order.iter().enumerate() {
        if let Some(l) = known.get(d) {
            pk.placed[i] = (Some(l.pack), l.offset, l.len, l.inner);
            pk.report.reused_objects += 1;
            if first.as_ref().is_some_and(|f| f.contains(d)) {
                pk.report.shared_with_first += 1;
            }
            continue;
        }
        pk.report.packed_objects += 1;
        let p = st.object_path(d);
        frame.clear();
        File::open(&p)
            .and_then(|mut f| f.read_to_end(&mut frame))
            .with_context(|| format!("reading object {}", p.display()))?;
        if *size > SOLID_MAX_OBJECT {
            pk.frame(&frame, &[(i, None)])?;
            continue;
        }
        if block.len() as u64 + size > BLOCK_MAX_BYTES {
            pk.frame(&block_frame(&block, level)?, &members)?;
            pk.report.blocks += 1;
            block.clear();
            members.clear();
        }
        let content = zstd::decode_all(&frame[..])
            .with_context(|| format!("decompressing object {}", p.display()))?;
        if content.len() as u64 != *size || Digest::of(&content) != *d {
            bail!("object {} does not match its name", p.display());
        }
        members.push((i, Some(block.len() as u64)));
        block.extend_from_slice(&content);
        pk.report.block_objects += 1;
    }
    if !block.is_empty() {
        pk.frame(&block_frame(&block, level)?, &members)?;
        pk.report.blocks += 1;
    }
    pk.close()?;
    // Number the packs in order of first use.
    let mut packs: Vec<PackRef> = Vec::new();
    let mut num: HashMap<Digest, u32> = HashMap::new();
    let mut locs = Vec::with_capacity(order.len());
    for (p, offset, len, inner) in &pk.placed {
        let p = p.context("an object was not placed in any pack")?;
        let n = *num.entry(p.digest).or_insert_with(|| {
            packs.push(p);
            (packs.len() - 1) as u32
        });
        locs.push(Loc {
            pack: n,
            offset: *offset,
            len: *len,
            inner: *inner,
        });
    }
    let idx = PackIndex {
        manifest_sha256: Digest::of(m_stored),
        packs,
        locs,
    };
    let stored = idx.encode()?;
    let mut report = pk.report;
    report.index_bytes = stored.len() as u64;
    Ok((stored, report))
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

/// Check that every object of image `id` is in its packs where the index
/// says, with the right content; returns the number of objects.
pub fn check_store(st: &Store, id: &str) -> Result<usize> {
    let (m_stored, _) = st.read_manifest_raw(id)?;
    let m = crate::format::codec::decode_manifest(&m_stored)?;
    let stored = fs::read(st.image_dir(id).join(INDEX_NAME)).context("reading the pack index")?;
    let idx = PackIndex::decode(&stored)?;
    let order = object_order(&m);
    let map = idx.locate(&Digest::of(&m_stored), &order)?;
    for (d, size) in &order {
        let l = map[d];
        let mut f = File::open(st.path().join(pack_rel(&l.pack.digest)))?;
        let mut frame = vec![0u8; l.len as usize];
        f.seek(io::SeekFrom::Start(l.offset))?;
        f.read_exact(&mut frame)?;
        let content = zstd::decode_all(&frame[..])?;
        let start = l.inner.unwrap_or(0) as usize;
        let got = content.get(start..start + *size as usize);
        if got.map(Digest::of) != Some(*d) {
            bail!("object {d} is not at {l:?} of pack {}", l.pack.digest);
        }
    }
    Ok(order.len())
}
