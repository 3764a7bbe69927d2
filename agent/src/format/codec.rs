//! A stored manifest: zstd, in content-defined frames, and the bounds a
//! reader puts on compressed bodies.

use std::io::Read;

use anyhow::{bail, Context, Result};

use crate::format::manifest::{self, Manifest};

/// Decompress and parse a manifest's stored bytes (after its signature has
/// been checked).
pub fn decode_manifest(stored: &[u8]) -> Result<Manifest> {
    let dec = zstd::stream::read::Decoder::new(stored).context("manifest is not a zstd stream")?;
    let mut json = Vec::new();
    dec.take(manifest::MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut json)
        .context("decompressing the manifest")?;
    if json.len() as u64 > manifest::MAX_MANIFEST_BYTES {
        bail!(
            "manifest exceeds {} bytes uncompressed",
            manifest::MAX_MANIFEST_BYTES
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
