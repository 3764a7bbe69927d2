//! Manifests in content-defined zstd frames, so that a node refetches only
//! the parts of a new manifest that differ from the manifests it holds.
//!
//! A manifest's JSON has the head on its first line and one entry per line
//! ([`crate::format::manifest::Manifest::to_json`]). [`encode`] cuts it after the
//! head and after every entry line whose 64-bit FNV-1a hash is 0 modulo
//! [`CUT_EVERY`] (so cuts depend on content, not on position: an insertion
//! changes only the frame it falls in), and compresses each piece as its
//! own zstd frame; the stored manifest is the frames back to back, still
//! one valid zstd stream for every reader.
//!
//! `publish` writes the frame list beside the manifest:
//!
//! ```text
//! STORE/images/<id>/manifest.frames.json   {"frames":[{"offset":…,"len":…,"sha256":"…"},…]}
//! ```
//!
//! A node ([`crate::net::fetch`]) splits the stored manifests in its state
//! directory into frames, fetches only the frames it lacks with `Range`
//! requests and assembles the stored bytes. The list is not signed and
//! needs no signature: the assembled bytes are checked against the
//! manifest's signature like a whole download, and anything amiss (no
//! list, a frame that does not match, a server without ranges) falls back
//! to fetching the manifest whole.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::format::manifest::Digest;

/// File name of the frame list inside `images/<id>/`.
pub const FRAMES_NAME: &str = "manifest.frames.json";
/// An entry line ends a frame when its hash is 0 modulo this (entries per
/// frame on average).
pub const CUT_EVERY: u64 = 256;
/// Largest frame list accepted, in bytes.
pub const MAX_FRAMES_BYTES: u64 = 16 << 20;

/// One frame of a stored manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameRef {
    /// Byte offset in the stored manifest.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// sha256 of the frame's bytes, hex.
    pub sha256: String,
}

/// The frame list file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameList {
    /// The frames, in order; together they are the stored manifest.
    pub frames: Vec<FrameRef>,
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Compress manifest JSON (one entry per line) into content-defined frames
/// at zstd `level`; returns the stored bytes and the frame list.
pub fn encode(json: &[u8], level: i32) -> Result<(Vec<u8>, FrameList)> {
    encode_reusing(json, level, &Pieces::default())
}

/// Frames keyed by the piece of JSON they hold ([`Unframed::by_piece`]).
pub type Pieces<'j, 'f> = crate::sys::fastmap::HashMap<&'j [u8], &'f [u8]>;

/// The pieces of `json` as byte ranges: a piece ends after the first line,
/// after every line whose [`fnv1a`] is a multiple of [`CUT_EVERY`], and at
/// the end. Lines are hashed in `threads` stretches at once (a line's cut
/// depends on that line alone).
fn cut(json: &[u8], threads: usize) -> Result<Vec<(usize, usize)>> {
    let line_end = |pos: usize| {
        json[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(json.len(), |i| pos + i + 1)
    };
    if json.is_empty() {
        return Ok(Vec::new());
    }
    let first = line_end(0);
    // Stretches of whole lines after the first.
    let mut bounds = vec![first];
    let step = (json.len() - first) / threads.max(1) + 1;
    while let Some(&b) = bounds.last() {
        if b >= json.len() {
            break;
        }
        let next = line_end((b + step).min(json.len() - 1).max(b));
        bounds.push(next);
    }
    let stretches: Vec<(usize, usize)> = bounds.windows(2).map(|w| (w[0], w[1])).collect();
    let ends = crate::sys::par::par_map(&stretches, threads, |&(a, b)| {
        let mut out = Vec::new();
        let mut pos = a;
        while pos < b {
            let end = line_end(pos);
            if fnv1a(&json[pos..end]) % CUT_EVERY == 0 {
                out.push(end);
            }
            pos = end;
        }
        Ok(out)
    })?;
    let mut cuts = vec![first];
    cuts.extend(ends.into_iter().flatten().filter(|&e| e != first));
    if cuts.last() != Some(&json.len()) {
        cuts.push(json.len());
    }
    let mut start = 0;
    Ok(cuts
        .into_iter()
        .map(|end| {
            let p = (start, end);
            start = end;
            p
        })
        .collect())
}

/// A stored manifest taken apart in one pass: its JSON and each frame with
/// the piece of that JSON it holds (for [`encode_reusing`]).
pub struct Unframed<'a> {
    /// The decompressed JSON.
    pub json: Vec<u8>,
    /// Each frame's bytes and where its piece lies in `json`.
    frames: Vec<(&'a [u8], std::ops::Range<usize>)>,
}

impl<'a> Unframed<'a> {
    /// Decompress `stored` frame by frame, at most `max_json` bytes of JSON
    /// in all.
    pub fn new(stored: &'a [u8], max_json: u64) -> Result<Unframed<'a>> {
        let parts = split(stored)?;
        if let Some(u) = Self::in_parallel(&parts, max_json)? {
            return Ok(u);
        }
        let mut json = Vec::new();
        let mut frames = Vec::new();
        for f in parts {
            let start = json.len();
            let left = (max_json + 1).saturating_sub(start as u64);
            std::io::Read::read_to_end(
                &mut std::io::Read::take(zstd::stream::read::Decoder::with_buffer(f)?, left),
                &mut json,
            )
            .context("decompressing a manifest frame")?;
            if json.len() as u64 > max_json {
                bail!("manifest larger than {max_json} bytes");
            }
            frames.push((f, start..json.len()));
        }
        Ok(Unframed { json, frames })
    }

    /// [`Self::new`] with the frames decompressed in parallel, when every
    /// frame declares its content size (as [`encode`] writes them) and they
    /// add up to at most `max_json`: each is then decoded to exactly that
    /// size, so a frame that decompresses past it is refused before any
    /// memory beyond the budget is taken. `None` when a size is missing.
    fn in_parallel(parts: &[&'a [u8]], max_json: u64) -> Result<Option<Unframed<'a>>> {
        let mut sizes = Vec::with_capacity(parts.len());
        for f in parts {
            match zstd::zstd_safe::get_frame_content_size(f) {
                Ok(Some(n)) => sizes.push(n),
                _ => return Ok(None),
            }
        }
        if sizes.iter().sum::<u64>() > max_json {
            bail!("manifest larger than {max_json} bytes");
        }
        let work: Vec<(&[u8], u64)> = parts.iter().copied().zip(sizes).collect();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pieces = crate::sys::par::par_map(&work, threads, |&(f, size)| {
            let mut out = Vec::with_capacity(size as usize);
            std::io::Read::read_to_end(
                &mut std::io::Read::take(zstd::stream::read::Decoder::with_buffer(f)?, size + 1),
                &mut out,
            )
            .context("decompressing a manifest frame")?;
            if out.len() as u64 != size {
                bail!(
                    "a manifest frame holds {} bytes, not the {size} it declares",
                    out.len()
                );
            }
            Ok(out)
        })?;
        let mut json = Vec::with_capacity(pieces.iter().map(Vec::len).sum());
        let mut frames = Vec::with_capacity(pieces.len());
        for (f, p) in parts.iter().zip(pieces) {
            let start = json.len();
            json.extend_from_slice(&p);
            frames.push((*f, start..json.len()));
        }
        Ok(Some(Unframed { json, frames }))
    }

    /// The frames keyed by the piece of JSON they hold.
    pub fn by_piece(&self) -> Pieces<'_, 'a> {
        self.frames
            .iter()
            .map(|(f, r)| (&self.json[r.clone()], *f))
            .collect()
    }
}

/// [`encode`], taking a frame from `reuse` (see [`Unframed::by_piece`])
/// instead of compressing its piece again at `level`: the same bytes as
/// [`encode`] when those frames were made by it at the same level. A
/// manifest published with a parent reuses the parent's frames and
/// compresses only the pieces the parent lacks, at
/// [`crate::format::codec::CHILD_FRAME_LEVEL`], so that a node rebuilding
/// it from an update delta ([`crate::format::delta`]) does the same in
/// little time.
pub fn encode_reusing(
    json: &[u8],
    level: i32,
    reuse: &Pieces<'_, '_>,
) -> Result<(Vec<u8>, FrameList)> {
    // Cut points first, then the pieces compressed in parallel: each is a
    // frame of its own, so the bytes do not depend on the order.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pieces = cut(json, threads)?;
    let coded = crate::sys::par::par_map(&pieces, threads, |&(a, b)| {
        let piece = &json[a..b];
        if let Some(f) = reuse.get(piece) {
            return Ok(f.to_vec());
        }
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), level)?;
        enc.include_checksum(false)?;
        enc.set_pledged_src_size(Some(piece.len() as u64))?;
        std::io::Write::write_all(&mut enc, piece)?;
        enc.finish().context("compressing the manifest")
    })?;
    let mut out = Vec::with_capacity(coded.iter().map(Vec::len).sum());
    let mut frames = Vec::with_capacity(coded.len());
    for f in coded {
        frames.push(FrameRef {
            offset: out.len() as u64,
            len: f.len() as u64,
            sha256: Digest::of(&f).to_hex(),
        });
        out.extend_from_slice(&f);
    }
    Ok((out, FrameList { frames }))
}

/// Split stored bytes into their zstd frames.
pub fn split(stored: &[u8]) -> Result<Vec<&[u8]>> {
    let mut v = Vec::new();
    let mut rest = stored;
    while !rest.is_empty() {
        let n = zstd::zstd_safe::find_frame_compressed_size(rest).map_err(|c| {
            anyhow::anyhow!("not a zstd frame ({})", zstd::zstd_safe::get_error_name(c))
        })?;
        if n == 0 || n > rest.len() {
            bail!("bad zstd frame length {n}");
        }
        v.push(&rest[..n]);
        rest = &rest[n..];
    }
    Ok(v)
}

/// Frames by sha256, from stored manifests a node holds.
pub fn known_frames(stored: &[Vec<u8>]) -> HashMap<String, Vec<u8>> {
    let mut m = HashMap::new();
    for s in stored {
        if let Ok(fr) = split(s) {
            for f in fr {
                m.entry(Digest::of(f).to_hex())
                    .or_insert_with(|| f.to_vec());
            }
        }
    }
    m
}

/// Check that a frame list describes one contiguous file.
pub fn check_list(l: &FrameList) -> Result<u64> {
    let mut end = 0u64;
    for f in &l.frames {
        if f.offset != end || f.len == 0 || f.sha256.len() != 64 {
            bail!("frame list is not contiguous at byte {end}");
        }
        end += f.len;
    }
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cut rule one line at a time, as publishers before the parallel
    /// cut applied it: the frames' bytes must not change.
    fn serial_cut(json: &[u8]) -> Vec<(usize, usize)> {
        let mut pieces: Vec<(usize, usize)> = Vec::new();
        let (mut start, mut pos) = (0, 0);
        while pos < json.len() {
            let end = json[pos..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(json.len(), |i| pos + i + 1);
            if pieces.is_empty() || fnv1a(&json[pos..end]) % CUT_EVERY == 0 || end == json.len() {
                pieces.push((start, end));
                start = end;
            }
            pos = end;
        }
        pieces
    }

    #[test]
    fn the_parallel_cut_is_the_serial_cut() {
        let big = json(5000, Some(17));
        let no_newline_at_end = b"head\nline one\nline two".to_vec();
        for j in [
            big,
            no_newline_at_end,
            b"one line".to_vec(),
            b"\n\n\n".to_vec(),
            Vec::new(),
        ] {
            for threads in [1, 2, 3, 8, 64] {
                assert_eq!(
                    cut(&j, threads).expect("cut"),
                    serial_cut(&j),
                    "{threads} threads"
                );
            }
        }
    }

    #[test]
    fn frames_decode_alike_in_parallel_and_in_order_and_a_lying_frame_is_refused() {
        let j = json(3000, None);
        let (stored, _) = encode(&j, 3).expect("encode");
        let u = Unframed::new(&stored, 1 << 30).expect("unframe");
        assert_eq!(u.json, j);
        assert!(u.frames.len() > 2, "several frames");
        let parts = split(&stored).expect("split");
        assert!(Unframed::in_parallel(&parts, 1 << 30)
            .expect("parallel")
            .is_some());
        // Over the budget: refused from the declared sizes alone.
        assert!(Unframed::new(&stored, j.len() as u64 - 1).is_err());
        // A frame declaring fewer bytes than it holds is refused.
        let piece = b"a piece of json that is longer than declared\n";
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).expect("enc");
        enc.set_pledged_src_size(Some(piece.len() as u64))
            .expect("pledge");
        std::io::Write::write_all(&mut enc, piece).expect("write");
        let mut f = enc.finish().expect("finish");
        // Patch the declared size down by one (single-byte field for small frames).
        let fhd = f[4];
        assert_eq!(fhd >> 6, 0, "a one-byte content size field");
        let at = 5 + usize::from(fhd & 0x20 == 0);
        f[at] -= 1;
        assert!(
            Unframed::new(&f, 1 << 20).is_err(),
            "a frame longer than it declares"
        );
    }

    fn json(n: usize, change: Option<usize>) -> Vec<u8> {
        let mut j = b"{\"format\":1,\"id\":\"x\",\"entries\":[\n".to_vec();
        for i in 0..n {
            let v = if Some(i) == change { 999_999 } else { i };
            j.extend_from_slice(format!("{{\"path\":\"p/{i}\",\"size\":{v}}},\n").as_bytes());
        }
        j.extend_from_slice(b"]}\n");
        j
    }

    #[test]
    fn frames_decode_as_one_stream_and_only_changed_frames_differ() {
        let a = json(5000, None);
        let (sa, la) = encode(&a, 3).expect("encode");
        assert_eq!(zstd::decode_all(&sa[..]).expect("decode"), a);
        assert!(la.frames.len() > 5, "{} frames", la.frames.len());
        assert_eq!(check_list(&la).expect("contiguous"), sa.len() as u64);
        assert_eq!(split(&sa).expect("split").len(), la.frames.len());
        let b = json(5000, Some(2500));
        let (sb, lb) = encode(&b, 3).expect("encode");
        let known = known_frames(&[sa]);
        let missing: Vec<&FrameRef> = lb
            .frames
            .iter()
            .filter(|f| !known.contains_key(&f.sha256))
            .collect();
        assert_eq!(missing.len(), 1, "one entry changed: one frame to fetch");
        assert_eq!(zstd::decode_all(&sb[..]).expect("decode"), b);
        assert!(split(b"junk").is_err());
    }
}
