//! Trusting a stored manifest: the keys a node trusts, and checking a
//! manifest's stored bytes against them before they are parsed.

use anyhow::{Context, Result};
use ed25519_dalek::VerifyingKey;

use crate::format::manifest::Manifest;
use crate::format::sign;
use crate::sys::error::ExitKind;

/// How manifests are trusted.
pub struct Trust<'a> {
    /// Trusted public keys.
    pub keys: &'a [VerifyingKey],
    /// Where they came from (for messages).
    pub keys_dir: String,
    /// Accept unsigned manifests.
    pub allow_unsigned: bool,
}

/// A resolved manifest plus its stored bytes (kept as the node's record).
pub struct Resolved {
    /// The parsed, validated manifest.
    pub manifest: Manifest,
    /// Stored bytes (`manifest.json.zst`), when it came from a store.
    pub stored: Vec<u8>,
    /// Signature bytes, when signed.
    pub sig: Option<Vec<u8>>,
    /// Key id that verified it.
    pub signed_by: Option<String>,
}

/// Check the signature over the stored bytes, then decompress and parse.
pub fn verify_stored(
    id: &str,
    stored: Vec<u8>,
    sig: Option<Vec<u8>>,
    trust: &Trust<'_>,
) -> Result<Resolved> {
    let signed_by = match sign::verify(&stored, sig.as_deref(), trust.keys, &trust.keys_dir) {
        Ok(k) => Some(k),
        Err(sign::SignatureError::Unsigned) if trust.allow_unsigned => None,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("manifest of image {id:?}"))
                .context(ExitKind::Untrusted)
        }
    };
    let manifest = crate::format::codec::decode_manifest(&stored)
        .with_context(|| format!("manifest of image {id:?}"))
        .context(ExitKind::Untrusted)?;
    if manifest.id != id {
        return Err(anyhow::anyhow!(
            "manifest says it is image {:?}, not {id:?}",
            manifest.id
        ))
        .context(ExitKind::Untrusted);
    }
    Ok(Resolved {
        manifest,
        stored,
        sig,
        signed_by,
    })
}
