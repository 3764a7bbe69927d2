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
    let dec = zstd::stream::read::Decoder::new(stored).context("manifest is not a zstd stream")?;
    let max = max_manifest_json(stored.len() as u64);
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

/// The largest body a zstd frame of `size` content bytes can need, in bytes
/// (`ZSTD_compressBound` plus frame header slack).
pub fn max_compressed(size: u64) -> u64 {
    size + (size >> 8) + 128 * 1024
}
