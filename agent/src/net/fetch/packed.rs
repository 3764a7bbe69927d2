//! The fetch step through packs ([`crate::format::pack`]): the objects an image's
//! signed pack index locates are downloaded as coalesced byte ranges of
//! packs, cut at object boundaries into the download cache and verified
//! one by one exactly like loose objects.
//!
//! - The pack index is fetched at the fetch step (not for `plan`), checked
//!   with the same keys and rules as the manifest (under a root of trust:
//!   the targets role's threshold, k of n, not any one targets key), and
//!   must name the manifest's sha256. A store without one (older publisher, plain copy)
//!   is used loose.
//! - Each span is one `Range: bytes=A-B` request. A broken body is retried
//!   from the first frame not yet taken; an object that does not match its
//!   digest is refused (untrusted input), never taken from elsewhere.
//! - A frame of its own is the object's loose frame: decompressed as it
//!   arrives and kept plain in the cache; a solid block is decompressed in memory (at most
//!   [`pack::BLOCK_MAX_BYTES`]) and each wanted object, once its digest
//!   matches, is stored in the cache as its plain content.
//! - A server that ignores `Range` and answers 200 still works: the body is
//!   read from byte 0 and skipped up to the span.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;

use anyhow::{anyhow, Context, Result};
use ed25519_dalek::VerifyingKey;

use super::{is_status, read_failed, Attempt, Cache, HttpStore, BUF, PARALLEL_DOWNLOADS};
use crate::format::codec::max_compressed;
use crate::format::manifest::Digest;
use crate::format::pack::{
    self, Located, PackIndex, PackRef, Part, Span, Want, COALESCE_GAP, MIN_SPAN_BYTES,
};
use crate::format::sign;
use crate::format::stream::{CappedReader, VerifyReader};
use crate::format::trust::{Resolved, Trust};
use crate::format::tuf::{Keys, Role};
use crate::fs::sparse::{self, CopyError};
use crate::sys::error::ExitKind;
use crate::sys::progress::Bar;

/// Below this many objects to fetch, they are fetched loose: the pack
/// index (two requests and a few bytes per object of the whole image) would
/// cost more than it saves.
pub const PACK_MIN_OBJECTS: usize = 8;

/// What is needed to find and trust an image's pack index.
pub(super) struct PackCtx {
    id: String,
    manifest_sha256: Digest,
    order: Vec<(Digest, u64)>,
    keys: Vec<VerifyingKey>,
    keys_dir: String,
    allow_unsigned: bool,
    /// Under a root of trust: its keys and targets role, whose threshold
    /// the pack index must meet like the manifest (one compromised targets
    /// key must not be able to sign a pack index alone).
    targets: Option<(Keys, Role)>,
}

impl HttpStore {
    /// Remember the verified manifest `r` of image `id`, so the fetch step
    /// can use that image's packs (checked with `trust`).
    pub fn use_packs(&self, id: &str, r: &Resolved, trust: &Trust<'_>) {
        let _ = self.packs.set(PackCtx {
            id: id.to_string(),
            manifest_sha256: Digest::of(&r.stored),
            order: pack::object_order(&r.manifest),
            keys: trust.keys.to_vec(),
            keys_dir: trust.keys_dir.clone(),
            allow_unsigned: trust.allow_unsigned,
            targets: trust
                .tuf
                .map(|(root, _)| (root.keys.clone(), root.role("targets").clone())),
        });
    }

    /// The verified pack index as digest → location; `None` when the image
    /// has none.
    fn load_packs(&self) -> Result<Option<HashMap<Digest, Located>>> {
        let Some(ctx) = self.packs.get() else {
            return Ok(None);
        };
        let rel = format!("images/{}/{}", ctx.id, pack::INDEX_NAME);
        let stored = match self.get_small(&rel, self.limits.max_pack_index_bytes) {
            Ok(b) => b,
            Err(e) if is_status(&e, &[403, 404, 410]) => {
                tracing::info!(
                    "image {:?} has no pack index; fetching loose objects",
                    ctx.id
                );
                return Ok(None);
            }
            Err(e) => return Err(e.context(format!("fetching the pack index of {:?}", ctx.id))),
        };
        let sig_rel = format!("images/{}/{}", ctx.id, pack::INDEX_SIG_NAME);
        let sig = match self.get_small(&sig_rel, super::MAX_SMALL_BYTES) {
            Ok(s) => Some(s),
            Err(e) if is_status(&e, &[403, 404, 410]) => None,
            Err(e) => {
                return Err(e.context(format!("fetching the pack index signature of {:?}", ctx.id)))
            }
        };
        let verdict = match &ctx.targets {
            Some((keys, role)) => sign::verify_role(&stored, sig.as_deref(), keys, role).map(drop),
            None => sign::verify(&stored, sig.as_deref(), &ctx.keys, &ctx.keys_dir).map(drop),
        };
        match verdict {
            Ok(()) => {}
            // A root of trust never accepts unsigned metadata (as for the
            // manifest, see crate::format::trust::verify_stored).
            Err(sign::SignatureError::Unsigned) if ctx.allow_unsigned && ctx.targets.is_none() => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("pack index of image {:?}", ctx.id))
                    .context(ExitKind::Untrusted)
            }
        }
        let map = PackIndex::decode(&stored)
            .and_then(|idx| idx.locate(&ctx.manifest_sha256, &ctx.order))
            .with_context(|| format!("pack index of image {:?}", ctx.id))
            .context(ExitKind::Untrusted)?;
        Ok(Some(map))
    }

    /// Fetch what packs cover of `fetch` (digest, content size in bytes);
    /// returns the objects left to fetch loose.
    pub(super) fn prefetch_packed(
        &self,
        cache: &Cache,
        fetch: &[(Digest, u64)],
        bar: &Bar,
    ) -> Result<Vec<(Digest, u64)>> {
        if fetch.len() < PACK_MIN_OBJECTS {
            // A few loose requests cost less than the pack index.
            return Ok(fetch.to_vec());
        }
        let Some(map) = self.load_packs()? else {
            return Ok(fetch.to_vec());
        };
        let mut loose = Vec::new();
        let mut wants = Vec::new();
        for &(d, size) in fetch {
            let fits = |l: &&Located| match l.inner {
                None => l.len <= max_compressed(size),
                Some(inner) => {
                    l.len <= max_compressed(pack::BLOCK_MAX_BYTES)
                        && inner + size <= pack::BLOCK_MAX_BYTES
                }
            };
            let Some(l) = map.get(&d).filter(fits) else {
                loose.push((d, size));
                continue;
            };
            if self.cached(cache, &d, size, bar)? {
                continue;
            }
            wants.push((*l, d, size));
        }
        let order = self.packs.get().map(|c| &c.order[..]).unwrap_or_default();
        let (wants, cheaper_loose) = pack::split_blocks(wants, &pack::block_bytes(&map, order));
        let from_blocks = cheaper_loose.len();
        loose.extend(cheaper_loose);
        let spans = pack::plan_spans(&wants, COALESCE_GAP, MIN_SPAN_BYTES);
        let total: u64 = spans.iter().map(|s| s.end - s.start).sum();
        // Cut again to about an equal share per parallel download.
        let target = (total / PARALLEL_DOWNLOADS as u64).max(MIN_SPAN_BYTES);
        let spans = pack::plan_spans(&wants, COALESCE_GAP, target);
        tracing::info!(
            "fetching {} objects from packs in {} range requests ({total} bytes); {} loose \
             ({from_blocks} of them cheaper loose than their solid blocks)",
            wants.len(),
            spans.len(),
            loose.len()
        );
        crate::sys::par::par_map(&spans, PARALLEL_DOWNLOADS, |s| {
            self.fetch_span(cache, s, bar)
        })?;
        Ok(loose)
    }

    fn fetch_span(&self, cache: &Cache, span: &Span, bar: &Bar) -> Result<()> {
        let url = self.join(&pack::pack_rel(&span.pack.digest))?;
        let mut done: Vec<bool> = vec![false; span.frames.len()];
        self.retrying(&url, || {
            self.span_attempt(cache, &url, span, &mut done, bar)
        })
        .with_context(|| {
            format!(
                "downloading {} frames (bytes {}-{}) of pack {} from the store at {}",
                span.frames.len(),
                span.start,
                span.end - 1,
                span.pack.digest,
                self.url()
            )
        })
    }

    /// One request for the frames of `span` not `done` yet.
    fn span_attempt(
        &self,
        cache: &Cache,
        url: &reqwest::Url,
        span: &Span,
        done: &mut [bool],
        bar: &Bar,
    ) -> Result<(), Attempt> {
        let Some(first) = done.iter().position(|d| !d) else {
            return Ok(());
        };
        let start = span.frames[first].offset;
        let last = span.end - 1;
        self.counters.pack_requests.fetch_add(1, Ordering::Relaxed);
        let resp = self.send_range(url, Some(format!("bytes={start}-{last}")))?;
        let status = resp.status().as_u16();
        let mut pos = match status {
            206 => {
                let cr = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !cr.starts_with(&format!("bytes {start}-")) {
                    return Err(Attempt::Fatal(anyhow!(
                        "{url}: asked for bytes {start}-{last} but got range {cr:?}"
                    )));
                }
                start
            }
            200 => 0,
            416 => {
                return Err(Attempt::Fatal(
                    anyhow!(
                        "{url} is shorter than its pack index says ({} bytes)",
                        span.pack.size
                    )
                    .context(ExitKind::Untrusted),
                ))
            }
            s => return Err(Attempt::Fatal(anyhow!("{url}: unexpected HTTP {s}"))),
        };
        // A 206 brings exactly the range; a 200 (Range ignored) the pack
        // from byte 0, read up to the span's end only.
        let cap = match status {
            206 => last + 1 - start,
            _ => span.end,
        };
        let mut body = self.body(resp, cap);
        let mut buf = vec![0u8; BUF];
        for (i, w) in span.frames.iter().enumerate().skip(first) {
            if w.offset < pos {
                return Err(Attempt::Fatal(anyhow!(
                    "{url}: overlapping frames in a span"
                )));
            }
            copy_exact(&mut body, w.offset - pos, None, &mut buf, url)?;
            pos = w.offset;
            if done[i] {
                copy_exact(&mut body, w.len, None, &mut buf, url)?;
            } else if w.parts.len() == 1 && w.parts[0].inner.is_none() {
                self.take_frame(cache, &mut body, w, &span.pack, &mut buf, url)?;
            } else {
                let mut frame = vec![0u8; w.len as usize];
                let mut sink = io::Cursor::new(&mut frame[..]);
                copy_exact(
                    &mut body,
                    w.len,
                    Some(&mut sink as &mut dyn Write),
                    &mut buf,
                    url,
                )?;
                self.take_block(cache, &frame, w, &span.pack)?;
            }
            pos += w.len;
            if !done[i] {
                done[i] = true;
                for p in &w.parts {
                    self.counters.objects.fetch_add(1, Ordering::Relaxed);
                    bar.object();
                    self.counters.packed.fetch_add(1, Ordering::Relaxed);
                    bar.inc(p.size);
                }
            }
        }
        if status == 206 {
            // Whatever of the range follows the last frame, then its end.
            copy_exact(&mut body, last + 1 - pos, None, &mut buf, url)?;
            body.expect_end().map_err(|e| read_failed(e, url))?;
        }
        Ok(())
    }

    /// A frame that is one object's loose frame: decompressed as it
    /// arrives, hashed, and kept plain in the cache once its digest matches
    /// (staging then only copies it, or links it into place).
    fn take_frame(
        &self,
        cache: &Cache,
        body: &mut impl Read,
        w: &Want,
        pack: &PackRef,
        buf: &mut [u8],
        url: &reqwest::Url,
    ) -> Result<(), Attempt> {
        let p = &w.parts[0];
        let mut out = cache.create_raw(&p.digest).map_err(cache_err)?;
        let mut section = Section {
            inner: body,
            left: w.len,
            broke: None,
        };
        let res = decode_into(&mut section, p, &mut out, buf);
        let res = match (res, section.broke.take()) {
            // The transfer broke: whatever the decoder made of it, retry.
            (Err(_), Some(e)) => Err(Attempt::Retry(
                anyhow!(e).context(format!("download of {url} broke off")),
            )),
            (Err(FrameError::Write(e)), None) => Err(cache_err(e)),
            (Err(FrameError::Bad(e)), None) => Err(refused(e, Some(p), w, pack)),
            // Bytes after the frame's end inside its span: read past them.
            (Ok(()), _) => {
                let rest = section.left;
                copy_exact(&mut section, rest, None, buf, url)
            }
        };
        if let Err(e) = res {
            let _ = cache.remove_raw_part(&p.digest);
            return Err(e);
        }
        cache.commit_raw(&p.digest).map_err(cache_err)
    }

    /// A solid block: decompress (bounded), cut out the wanted objects,
    /// verify each and keep it plain in the cache.
    fn take_block(
        &self,
        cache: &Cache,
        frame: &[u8],
        w: &Want,
        pack: &PackRef,
    ) -> Result<(), Attempt> {
        let mut content = Vec::new();
        let dec = zstd::stream::read::Decoder::new(frame)
            .and_then(|d| d.take(pack::BLOCK_MAX_BYTES + 1).read_to_end(&mut content));
        if let Err(e) = dec {
            return Err(refused(
                anyhow!(e).context("not a valid zstd frame"),
                None,
                w,
                pack,
            ));
        }
        if content.len() as u64 > pack::BLOCK_MAX_BYTES {
            return Err(refused(
                anyhow!("block larger than {} bytes", pack::BLOCK_MAX_BYTES),
                None,
                w,
                pack,
            ));
        }
        for p in &w.parts {
            let at = p.inner.unwrap_or(0) as usize;
            let slice = content.get(at..at + p.size as usize);
            if slice.map(Digest::of) != Some(p.digest) {
                return Err(refused(
                    anyhow!("content digest mismatch"),
                    Some(p),
                    w,
                    pack,
                ));
            }
            let Some(slice) = slice else { continue };
            cache
                .create_raw(&p.digest)
                .and_then(|mut f| f.write_all(slice))
                .and_then(|()| cache.commit_raw(&p.digest))
                .map_err(cache_err)?;
        }
        Ok(())
    }
}

fn cache_err(e: io::Error) -> Attempt {
    Attempt::Fatal(anyhow!(e).context("writing to the download cache"))
}

/// An object from a pack that is not what its digest says (`p`), or a
/// block that cannot be decompressed (`None`: every wanted object of it is
/// named): untrusted input, final.
fn refused(e: anyhow::Error, p: Option<&Part>, w: &Want, pack: &PackRef) -> Attempt {
    let what = match p {
        Some(p) => format!("object {}", p.digest),
        None => format!(
            "the block holding objects {}",
            w.parts
                .iter()
                .map(|p| p.digest.to_hex())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Attempt::Fatal(
        e.context(format!(
            "{what} (in the frame at bytes {}-{} of pack {}) does not match its digest; refused (nothing of it reached the root)",
            w.offset,
            w.offset + w.len - 1,
            pack.digest
        ))
        .context(ExitKind::Untrusted),
    )
}

/// The next `left` bytes of a span's body: one frame. A failed read is
/// kept apart (a broken transfer), so it is not mistaken for a bad frame.
struct Section<'a, R> {
    inner: &'a mut R,
    left: u64,
    broke: Option<io::Error>,
}

impl<R: Read> Read for Section<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let want = out
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        match self.inner.read(&mut out[..want]) {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::UnexpectedEof, "body ended early");
                self.broke = Some(io::Error::new(e.kind(), e.to_string()));
                Err(e)
            }
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.broke = Some(e);
                Err(copy)
            }
        }
    }
}

/// Why a frame did not reach the cache.
enum FrameError {
    /// Not a valid frame of its object, or not its content.
    Bad(anyhow::Error),
    /// Writing the cache failed.
    Write(io::Error),
}

/// Decompress one frame of object `p` from `r` into `out` (holes where
/// whole chunks are zero, at its final length), checking its size (a frame
/// that decompresses past it stops there) and digest.
fn decode_into(
    r: &mut impl Read,
    p: &Part,
    out: &mut std::fs::File,
    buf: &mut [u8],
) -> Result<(), FrameError> {
    let bad = |e: io::Error| FrameError::Bad(anyhow!(e).context("not a valid zstd frame"));
    let dec = zstd::stream::read::Decoder::new(r)
        .map_err(bad)?
        .single_frame();
    let mut vr = VerifyReader::new(CappedReader::new(dec, p.size));
    match sparse::copy(&mut vr, out, buf, |_| {}) {
        Ok(_) => {}
        Err(CopyError::Read(e)) => return Err(bad(e)),
        Err(CopyError::Write(e)) => return Err(FrameError::Write(e)),
    }
    match vr.finish(&p.digest, p.size) {
        Ok(Ok(())) => out.set_len(p.size).map_err(FrameError::Write),
        Ok(Err(v)) => Err(FrameError::Bad(anyhow!(v))),
        Err(e) => Err(bad(e)),
    }
}

/// Move exactly `n` bytes from `r` to `out` (or discard them). A short or
/// broken body is worth a retry; a failing write is not.
fn copy_exact(
    r: &mut impl Read,
    n: u64,
    mut out: Option<&mut dyn Write>,
    buf: &mut [u8],
    url: &reqwest::Url,
) -> Result<(), Attempt> {
    let mut left = n;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let got = match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(Attempt::Retry(anyhow!(
                    "{url}: body ended {left} bytes early"
                )))
            }
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(Attempt::Retry(
                    anyhow!(e).context(format!("download of {url} broke off")),
                ))
            }
        };
        if let Some(f) = out.as_deref_mut() {
            f.write_all(&buf[..got])
                .map_err(|e| Attempt::Fatal(anyhow!(e).context("writing to the download cache")))?;
        }
        left -= got as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    /// Decode into a temporary file and read it back.
    fn into_file(s: &mut Section<'_, &[u8]>, p: &Part) -> (Result<(), FrameError>, Vec<u8>) {
        let mut f = tempfile::tempfile().expect("tempfile");
        let r = decode_into(s, p, &mut f, &mut [0u8; 4096]);
        let mut back = Vec::new();
        f.seek(io::SeekFrom::Start(0))
            .and_then(|_| f.read_to_end(&mut back))
            .expect("read back");
        (r, back)
    }

    fn part(content: &[u8]) -> Part {
        Part {
            digest: Digest::of(content),
            size: content.len() as u64,
            inner: None,
        }
    }

    fn decode(frame: &[u8], p: &Part) -> (Result<(), FrameError>, Option<io::Error>, Vec<u8>) {
        let mut body = frame;
        let mut s = Section {
            inner: &mut body,
            left: frame.len() as u64,
            broke: None,
        };
        let (r, out) = into_file(&mut s, p);
        (r, s.broke, out)
    }

    #[test]
    fn a_frame_decodes_into_its_content_once_its_digest_matches() {
        // With a run of zeros long enough to become a hole, and at the end.
        let mut content: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        content.extend(std::iter::repeat_n(0, 20_000));
        content.extend(b"tail");
        content.extend(std::iter::repeat_n(0, 9_000));
        let frame = zstd::bulk::compress(&content, 3).expect("zstd");
        let (r, broke, out) = decode(&frame, &part(&content));
        assert!(r.is_ok() && broke.is_none());
        assert_eq!(out, content);
    }

    #[test]
    fn a_bad_frame_is_refused_and_a_short_body_is_a_broken_transfer() {
        let content = vec![7u8; 50_000];
        let frame = zstd::bulk::compress(&content, 3).expect("zstd");
        // Another object's frame: the digest does not match.
        let (r, broke, _) = decode(&frame, &part(&vec![8u8; 50_000]));
        assert!(matches!(r, Err(FrameError::Bad(_))) && broke.is_none());
        // Decompresses past the declared size (a bomb): refused, bounded.
        let small = Part {
            size: 10,
            ..part(&content)
        };
        let (r, broke, out) = decode(&frame, &small);
        assert!(matches!(r, Err(FrameError::Bad(_))) && broke.is_none());
        assert!(out.len() <= 10);
        // Not zstd at all.
        let (r, _, _) = decode(b"not a zstd frame at all", &part(&content));
        assert!(matches!(r, Err(FrameError::Bad(_))));
        // The body ends inside the frame: the transfer broke, not the frame.
        let mut body = &frame[..frame.len() / 2];
        let mut s = Section {
            inner: &mut body,
            left: frame.len() as u64,
            broke: None,
        };
        let (r, _) = into_file(&mut s, &part(&content));
        assert!(r.is_err());
        assert!(
            s.broke.is_some(),
            "a short body counts as a broken transfer"
        );
    }
}
