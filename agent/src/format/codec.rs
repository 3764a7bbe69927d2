//! A stored manifest: zstd, in content-defined frames, and the bounds a
//! reader puts on compressed bodies.

use std::io::Read;

use anyhow::{bail, Context, Result};

use crate::format::manifest::{self, Manifest};

/// A stored manifest decompresses to at most this many times its own
/// length (manifests hold a 64-hex-digit digest per file and compress
/// some 3-10 times; a zstd bomb, hundreds or thousands of times).
pub const MAX_MANIFEST_RATIO: u64 = 64;

/// The most JSON bytes `stored` (a stored manifest of that length) may
/// decompress to: [`MAX_MANIFEST_RATIO`] times its length, at most
/// [`manifest::MAX_MANIFEST_BYTES`].
pub fn max_manifest_json(stored_len: u64) -> u64 {
    stored_len
        .saturating_mul(MAX_MANIFEST_RATIO)
        .min(manifest::MAX_MANIFEST_BYTES)
}

/// Decompress and parse a manifest's stored bytes (after its signature has
/// been checked); the output is bounded by [`max_manifest_json`].
pub fn decode_manifest(stored: &[u8]) -> Result<Manifest> {
    let max = max_manifest_json(stored.len() as u64);
    // Line by line straight from the decompressor when the manifest has
    // the layout `publish` writes; on anything else the whole document is
    // parsed below, which also gives every error its usual form.
    if let Ok(dec) = zstd::stream::read::Decoder::new(stored) {
        let r = std::io::BufReader::with_capacity(256 * 1024, dec);
        if let Ok(m) = manifest::parse_lines(r, max) {
            return Ok(m);
        }
    }
    let dec = zstd::stream::read::Decoder::new(stored).context("manifest is not a zstd stream")?;
    let mut json = Vec::new();
    dec.take(max + 1)
        .read_to_end(&mut json)
        .context("decompressing the manifest")?;
    if json.len() as u64 > max {
        bail!(
            "manifest decompresses to more than {max} bytes ({MAX_MANIFEST_RATIO} times its {} stored bytes); refused",
            stored.len()
        );
    }
    Ok(Manifest::parse(&json)?)
}

/// zstd level of manifests written by `publish`.
pub const MANIFEST_LEVEL: i32 = 19;

/// Compress a manifest for storage (content-defined frames, see
/// [`crate::format::mframes`]; level 9, for manifests computed on the fly).
pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>> {
    Ok(crate::format::mframes::encode(&m.to_json(), 9)?.0)
}

/// Compress a manifest for publishing: the stored bytes and their frame
/// list ([`crate::format::mframes::FRAMES_NAME`]).
pub fn encode_manifest_framed(
    m: &Manifest,
) -> Result<(Vec<u8>, crate::format::mframes::FrameList)> {
    crate::format::mframes::encode(&m.to_json(), MANIFEST_LEVEL)
}

/// zstd level of the frames of a manifest published with a parent that
/// hold pieces the parent's manifest lacks (the others are the parent's
/// frames as they are, see [`encode_manifest_framed_child`]). Level 1: a
/// node rebuilding the manifest from an update delta compresses those
/// pieces again, some hundred times faster than at [`MANIFEST_LEVEL`], for
/// frames about 6% larger.
pub const CHILD_FRAME_LEVEL: i32 = 1;

/// Compress a manifest published with a parent whose stored manifest is
/// `parent_stored`: the parent's frame for every piece of JSON it has, the
/// other pieces at [`CHILD_FRAME_LEVEL`]. A node holding the parent's
/// stored bytes rebuilds these bytes exactly from the JSON alone
/// ([`crate::format::mframes::encode_reusing`]).
pub fn encode_manifest_framed_child(
    m: &Manifest,
    parent_stored: &[u8],
) -> Result<(Vec<u8>, crate::format::mframes::FrameList)> {
    let parent = crate::format::mframes::Unframed::new(parent_stored, manifest::MAX_MANIFEST_BYTES)
        .context("the parent's stored manifest")?;
    crate::format::mframes::encode_reusing(&m.to_json(), CHILD_FRAME_LEVEL, &parent.by_piece())
}

/// The largest body a zstd frame of `size` content bytes can need, in bytes
/// (`ZSTD_compressBound` plus frame header slack).
pub fn max_compressed(size: u64) -> u64 {
    size + (size >> 8) + 128 * 1024
}
