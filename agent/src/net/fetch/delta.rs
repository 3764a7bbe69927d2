//! Updating through an update delta ([`crate::format::delta`]): a node whose
//! current image is the one the target image was published from (`publish
//! --parent`) gets the target's manifest and the objects it lacks from one
//! static file, usually in one or two requests.
//!
//! - Resolving the manifest: the first [`HEAD_BYTES`] of
//!   `images/<id>/deltas/<current>.delta` (one `Range` request; a small
//!   delta comes whole). The header must name the node's current stored
//!   manifest by sha256; the manifest patch, decompressed against the
//!   current manifest's JSON and re-encoded ([`crate::format::mframes`]), must hash
//!   to the header's sha256 of the target's stored manifest; the caller then
//!   checks the embedded signature exactly as for a downloaded manifest.
//!   Anything amiss (no delta: 404, another image, a mismatch, a server
//!   error) and the manifest is fetched the usual way; the delta is dropped.
//! - The fetch step: when the objects the plan needs that the payload holds
//!   make up at least half of it ([`MIN_SHARE`]), the rest of the file is
//!   fetched with one `Range` request and decoded as it arrives. A patch
//!   object needs the current image's file at its path, which must be what
//!   the current manifest says (regular file, same digest): otherwise that
//!   object is left to packs. Each object is verified against the signed
//!   manifest's digest before it enters the download cache. A broken body is
//!   retried from the payload's start (objects already cached are skipped);
//!   an object that does not verify, or a payload that does not decode,
//!   drops the delta (nothing unverified is kept) and the rest comes from
//!   packs and loose objects, whose checks are unchanged.

use std::collections::HashMap;
use std::io::{self, Cursor, Read};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{anyhow, bail, Context, Result};

use super::{read_failed, Attempt, Cache, HttpStore};
use crate::format::delta::{self, Header, Kind, ObjectError, Payload};
use crate::format::manifest::id_of_head;
use crate::format::manifest::{Digest, FileType, Manifest, RelPath, MAX_MANIFEST_BYTES};
use crate::format::mframes::{self, Unframed};
use crate::fs::fsx;
use crate::fs::rootfs::CURRENT_MANIFEST;
use crate::sys::progress::Bar;

/// Bytes asked for by the first request of a delta (a small delta comes
/// whole; a large one brings its header and manifest patch).
pub const HEAD_BYTES: u64 = 256 * 1024;
/// A server that ignores `Range` sends the whole delta: taken when it is at
/// most this many bytes, in memory.
pub const MAX_WHOLE_BYTES: u64 = 32 << 20;
/// The payload is fetched only when the objects needed from it make up at
/// least 1/`MIN_SHARE` of its decompressed bytes.
pub const MIN_SHARE: u64 = 2;
/// Write buffer of an object rebuilt from a delta into the download cache
/// (kept plain there), in bytes.
const RAW_BUF: usize = 128 * 1024;

/// An accepted delta, kept from manifest resolution to the fetch step.
pub(super) struct DeltaCtx {
    url: reqwest::Url,
    header: Header,
    /// The file's first bytes, as fetched so far.
    head: Vec<u8>,
    /// Offset of the payload in the file.
    payload_at: usize,
    /// The current image's manifest JSON (patch references are checked
    /// against it; parsed only when a patch is taken, at the fetch step).
    current_json: Vec<u8>,
}

impl DeltaCtx {
    /// The image the delta applies to.
    pub(super) fn from(&self) -> &str {
        &self.header.from
    }
}

impl HttpStore {
    /// The stored manifest and signature of image `id` rebuilt from the
    /// update delta from the node's current image; `None` (the delta is not
    /// used) when there is none or it does not check out.
    pub fn manifest_from_delta(&self, id: &str) -> Option<(Vec<u8>, Option<Vec<u8>>)> {
        crate::format::manifest::validate_image_id(id).ok()?;
        let stored = std::fs::read(self.state_dir.as_ref()?.join(std::ffi::OsStr::new(
            std::str::from_utf8(CURRENT_MANIFEST).ok()?,
        )))
        .ok()?;
        match self.try_delta(id, &stored) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::info!("not using an update delta for image {id:?}: {e:#}");
                None
            }
        }
    }

    fn try_delta(&self, id: &str, cur_stored: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        // Decompressed once: the JSON the patch applies to, and the frames
        // the rebuilt manifest shares with it.
        let cur = Unframed::new(cur_stored, MAX_MANIFEST_BYTES).context("the current manifest")?;
        let current_id = match id_of_head(&cur.json) {
            Some(c) => c,
            None => {
                Manifest::parse(&cur.json)
                    .context("the current manifest")?
                    .id
            }
        };
        if current_id == id {
            bail!("the node is on {id:?} already");
        }
        let url = self.join(&delta::delta_rel(id, &current_id))?;
        let (mut head, total) = self
            .retrying(&url, || self.delta_head(&url))
            .with_context(|| format!("fetching {url}"))?;
        let head_len = Header::head_len(&head)?;
        self.delta_more(&url, &mut head, head_len as u64, total)?;
        let (header, at) = Header::parse(&head)?;
        if header.file_len(at) != total {
            bail!(
                "{url} is {total} bytes but its header says {}",
                header.file_len(at)
            );
        }
        if header.from != current_id || header.to != id {
            bail!(
                "{url} is the delta from {:?} to {:?}",
                header.from,
                header.to
            );
        }
        if header.from_sha256 != Digest::of(cur_stored) {
            bail!("{url} was made from another manifest of {current_id:?}");
        }
        let payload_at = at + header.mpatch_len as usize;
        self.delta_more(&url, &mut head, payload_at as u64, total)?;
        let json = delta::patch_decode(&cur.json, &head[at..payload_at], header.manifest_len)
            .context("decompressing the manifest patch")?;
        if json.len() as u64 != header.manifest_len {
            bail!(
                "the manifest patch gives {} bytes, not {}",
                json.len(),
                header.manifest_len
            );
        }
        let (stored, _) = mframes::encode_reusing(&json, header.frame_level, &cur.by_piece())?;
        if Digest::of(&stored) != header.to_sha256 {
            bail!("the manifest rebuilt from {url} is not the published one (sha256 differs)");
        }
        let sig = header.sig.clone();
        let _ = self.store_ok.set(());
        tracing::info!(
            "update delta {url}: {total} bytes, {} objects",
            header.objects.len()
        );
        *self.delta.lock().unwrap_or_else(|e| e.into_inner()) = Some(DeltaCtx {
            url,
            header,
            head,
            payload_at,
            current_json: cur.json,
        });
        Ok((stored, sig))
    }

    /// Forget the delta (its manifest was not trusted).
    pub fn drop_delta(&self) {
        *self.delta.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The delta's first [`HEAD_BYTES`] (or all of it from a server without
    /// ranges, when small enough) and its total length.
    fn delta_head(&self, url: &reqwest::Url) -> Result<(Vec<u8>, u64), Attempt> {
        let resp = self.send_range(url, Some(format!("bytes=0-{}", HEAD_BYTES - 1)))?;
        let (total, limit) = match resp.status().as_u16() {
            206 => {
                let total = content_range_total(&resp).ok_or_else(|| {
                    Attempt::Fatal(anyhow!("{url}: no total length in Content-Range"))
                })?;
                (total, HEAD_BYTES.min(total))
            }
            200 => {
                let total = resp.content_length().unwrap_or(u64::MAX);
                if total > MAX_WHOLE_BYTES {
                    return Err(Attempt::Fatal(anyhow!(
                        "{url}: the server ignores Range and the delta is {total} bytes"
                    )));
                }
                (total, total)
            }
            s => return Err(Attempt::Fatal(anyhow!("{url}: HTTP {s}"))),
        };
        let mut body = Vec::with_capacity(limit as usize);
        match self.body(resp, limit).read_to_end(&mut body) {
            Ok(n) if n as u64 == limit => Ok((body, total)),
            Ok(n) => Err(Attempt::Retry(anyhow!("{url}: body ended after {n} bytes"))),
            Err(e) => Err(read_failed(e, url)),
        }
    }

    /// Make `head` hold at least `upto` bytes of the file (one more `Range`
    /// request when it does not).
    fn delta_more(
        &self,
        url: &reqwest::Url,
        head: &mut Vec<u8>,
        upto: u64,
        total: u64,
    ) -> Result<()> {
        if head.len() as u64 >= upto {
            return Ok(());
        }
        if upto > total || upto > self.limits.max_manifest_bytes + delta::MAX_HEADER_BYTES {
            bail!("{url} is shorter than its header says");
        }
        let start = head.len() as u64;
        let more = self.retrying(url, || {
            let resp = self.send_range(url, Some(format!("bytes={start}-{}", upto - 1)))?;
            if resp.status().as_u16() != 206 {
                return Err(Attempt::Fatal(anyhow!(
                    "{url}: HTTP {} to a range request",
                    resp.status()
                )));
            }
            let mut body = Vec::new();
            match self.body(resp, upto - start).read_to_end(&mut body) {
                Ok(n) if n as u64 == upto - start => Ok(body),
                Ok(n) => Err(Attempt::Retry(anyhow!("{url}: body ended after {n} bytes"))),
                Err(e) => Err(read_failed(e, url)),
            }
        })?;
        head.extend_from_slice(&more);
        Ok(())
    }

    /// Fetch step: take from the accepted delta what it holds of `fetch`
    /// (digest, content size in bytes); returns what is left to fetch.
    pub(super) fn prefetch_delta(
        &self,
        cache: &Cache,
        fetch: &[(Digest, u64)],
        bar: &Bar,
    ) -> Result<Vec<(Digest, u64)>> {
        let guard = self.delta.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ctx) = guard.as_ref() else {
            return Ok(fetch.to_vec());
        };
        let mut wanted: HashMap<Digest, u64> = HashMap::new();
        for &(d, size) in fetch {
            if self.cached(cache, &d, size, bar)? {
                continue;
            }
            wanted.insert(d, size);
        }
        let h = &ctx.header;
        let covered: Vec<bool> = h
            .objects
            .iter()
            .map(|o| wanted.get(&o.digest) == Some(&o.size))
            .collect();
        let covered_raw: u64 = h
            .objects
            .iter()
            .zip(&covered)
            .filter(|(_, c)| **c)
            .map(|(o, _)| o.raw_len())
            .sum();
        let left = |done: &[bool]| -> Vec<(Digest, u64)> {
            let taken: std::collections::HashSet<Digest> = h
                .objects
                .iter()
                .zip(done)
                .filter(|(_, d)| **d)
                .map(|(o, _)| o.digest)
                .collect();
            fetch
                .iter()
                .filter(|(d, _)| wanted.contains_key(d) && !taken.contains(d))
                .copied()
                .collect()
        };
        if covered_raw == 0 || covered_raw.saturating_mul(MIN_SHARE) < h.payload_raw_len() {
            tracing::info!(
                "the update delta holds {covered_raw} of its {} bytes for this node; not fetching it",
                h.payload_raw_len()
            );
            return Ok(left(&vec![false; h.objects.len()]));
        }
        let root = self.root_dir.as_ref().and_then(|r| fsx::open_dir(r).ok());
        let patches = h
            .objects
            .iter()
            .zip(&covered)
            .any(|(o, c)| *c && matches!(o.kind, Kind::Patch { .. }));
        let current = patches
            .then(|| current_manifest(&ctx.current_json))
            .flatten();
        let refs = Refs {
            current: current.as_ref(),
            root: root.as_ref(),
        };
        let mut done = vec![false; h.objects.len()];
        let res = self.retrying(&ctx.url, || {
            self.payload_attempt(ctx, cache, &covered, &mut done, &refs, bar)
        });
        if let Err(e) = res {
            tracing::warn!(
                "update delta {} dropped: {e:#}; fetching the rest from packs",
                ctx.url
            );
        }
        Ok(left(&done))
    }

    /// One pass over the payload: the objects `covered` and not `done` go
    /// into the cache.
    fn payload_attempt(
        &self,
        ctx: &DeltaCtx,
        cache: &Cache,
        covered: &[bool],
        done: &mut [bool],
        refs: &Refs<'_>,
        bar: &Bar,
    ) -> Result<(), Attempt> {
        let h = &ctx.header;
        let total = h.file_len(ctx.payload_at - h.mpatch_len as usize);
        let have = ctx.head.len() as u64;
        let broke = AtomicBool::new(false);
        let rest: Box<dyn Read + '_> = if have < total {
            let resp = self.send_range(&ctx.url, Some(format!("bytes={have}-{}", total - 1)))?;
            let (skip, left) = match resp.status().as_u16() {
                206 => (0, total - have),
                200 => (have, total),
                s => return Err(Attempt::Fatal(anyhow!("{}: HTTP {s}", ctx.url))),
            };
            let mut r = NetReader {
                inner: self.body(resp, left),
                broke: &broke,
                left,
            };
            io::copy(&mut (&mut r).take(skip), &mut io::sink())
                .map_err(|e| Attempt::Retry(anyhow!(e)))?;
            Box::new(r)
        } else {
            Box::new(io::empty())
        };
        let payload = Cursor::new(&ctx.head[ctx.payload_at.min(ctx.head.len())..]).chain(rest);
        let mut p = Payload::new(payload).map_err(|e| Attempt::Fatal(anyhow!(e)))?;
        let classify = |e: ObjectError, what: String| {
            let e = anyhow!(e).context(what);
            if broke.load(Ordering::Relaxed) {
                Attempt::Retry(e)
            } else {
                Attempt::Fatal(e)
            }
        };
        // The whole payload is read (and its end checked) even when the
        // last objects are not needed: the server sends them anyway.
        for (i, o) in h.objects.iter().enumerate() {
            let reference = match (&o.kind, covered[i] && !done[i]) {
                (_, false) | (Kind::Full, true) => None,
                (
                    Kind::Patch {
                        from,
                        from_size,
                        path,
                        ..
                    },
                    true,
                ) => refs.content(path, from, *from_size),
            };
            let wanted = covered[i] && !done[i];
            if !(wanted && (o.kind == Kind::Full || reference.is_some())) {
                p.skip(o)
                    .map_err(|e| classify(e, format!("object {} of the delta", o.digest)))?;
                continue;
            }
            let part = cache.create_raw(&o.digest).map_err(cache_err)?;
            let mut out = io::BufWriter::with_capacity(RAW_BUF, part);
            let r = p.object(o, reference.as_deref(), &mut out);
            let r = r.and_then(|()| {
                out.into_inner()
                    .map(drop)
                    .map_err(|e| ObjectError::Write(o.digest, e.into_error()))
            });
            if let Err(e) = r {
                let _ = cache.remove_raw_part(&o.digest);
                let what = format!(
                    "object {} of the update delta (not taken; nothing of it reached the root)",
                    o.digest
                );
                return Err(match e {
                    ObjectError::Write(..) => Attempt::Fatal(anyhow!(e).context(what)),
                    e => classify(e, what),
                });
            }
            cache.commit_raw(&o.digest).map_err(cache_err)?;
            done[i] = true;
            self.counters.objects.fetch_add(1, Ordering::Relaxed);
            bar.object();
            self.counters.delta_objects.fetch_add(1, Ordering::Relaxed);
            bar.inc(o.size);
        }
        p.finish()
            .map_err(|e| classify(e, "the end of the delta payload".into()))
    }
}

fn cache_err(e: io::Error) -> Attempt {
    Attempt::Fatal(anyhow!(e).context("writing to the download cache"))
}

/// The current manifest, parsed for the patch references (`None`, every
/// patch left to packs, when it does not parse).
fn current_manifest(json: &[u8]) -> Option<Manifest> {
    Manifest::parse(json)
        .inspect_err(|e| {
            tracing::warn!(
                "the current manifest does not parse ({e}); no patch of the update delta is used"
            )
        })
        .ok()
}

/// Where the references of patches come from: the current image's files.
struct Refs<'a> {
    /// The current image's manifest.
    current: Option<&'a Manifest>,
    /// The root.
    root: Option<&'a std::os::fd::OwnedFd>,
}

impl Refs<'_> {
    /// The content of the current image's file at `path` when it is the
    /// reference a patch was made against; `None` (the object is left to
    /// packs) when the current manifest or the root disagree.
    fn content(&self, path: &RelPath, from: &Digest, from_size: u64) -> Option<Vec<u8>> {
        let Some(e) = self.current?.entry(path) else {
            tracing::info!("{path}: not in the current manifest; its new version comes from packs");
            return None;
        };
        if e.ftype != FileType::File || e.sha256.as_ref() != Some(from) || e.size != from_size {
            tracing::info!("{path}: not the file the delta's patch was made against");
            return None;
        }
        let mut v = Vec::with_capacity(from_size as usize);
        let read = fsx::open_file_beneath(self.root?.as_fd(), path)
            .and_then(|f| f.take(from_size + 1).read_to_end(&mut v));
        if read.is_err() || Digest::of(&v) != *from {
            tracing::info!("{path} changed on this node; its new version comes from packs");
            return None;
        }
        Some(v)
    }
}

/// The total length in a `Content-Range: bytes A-B/TOTAL` header.
fn content_range_total(resp: &reqwest::blocking::Response) -> Option<u64> {
    resp.headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?
        .rsplit('/')
        .next()?
        .parse()
        .ok()
}

/// A response body that remembers whether it failed (a broken connection
/// is worth a retry; a payload that does not decode is not).
struct NetReader<'a, R> {
    inner: R,
    broke: &'a AtomicBool,
    /// Bytes the response still owes.
    left: u64,
}

impl<R: Read> Read for NetReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        match self.inner.read(&mut buf[..n]) {
            Ok(0) => {
                self.broke.store(true, Ordering::Relaxed);
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("body ended {} bytes early", self.left),
                ))
            }
            Ok(k) => {
                self.left -= k as u64;
                if self.left == 0 {
                    // The response must end with the range asked for: more
                    // is refused rather than left unread.
                    match self.inner.read(&mut [0u8; 1]) {
                        Ok(0) => {}
                        Ok(_) => {
                            return Err(io::Error::other(
                                "the response continues past the range asked for; refused",
                            ))
                        }
                        Err(e) => {
                            if super::body::body_error(&e).is_none() {
                                self.broke.store(true, Ordering::Relaxed);
                            }
                            return Err(e);
                        }
                    }
                }
                Ok(k)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.broke.store(true, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }
}
