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
    /// With a root of trust: the root (whose `targets` role must sign, k of
    /// n) and the verified index (which must list the manifest's bytes;
    /// `None` for a rollback in place, whose manifest is the node's own
    /// record of an image it installed). `keys` then holds the targets
    /// keys, for pack indexes.
    pub tuf: Option<(
        &'a crate::format::tuf::Root,
        Option<&'a crate::format::tuf::Timestamp>,
    )>,
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
    if let Some((root, index)) = trust.tuf {
        if let Some(index) = index {
            index
                .check_listed(id, &stored)
                .map_err(anyhow::Error::from)
                .context(ExitKind::Untrusted)?;
        }
        let ids = sign::verify_role(&stored, sig.as_deref(), &root.keys, root.role("targets"))
            .map_err(anyhow::Error::from)
            .with_context(|| format!("manifest of image {id:?}"))
            .context(ExitKind::Untrusted)?;
        return parse_verified(id, stored, sig, Some(ids.join(",")));
    }
    let signed_by = match sign::verify(&stored, sig.as_deref(), trust.keys, &trust.keys_dir) {
        Ok(k) => Some(k),
        Err(sign::SignatureError::Unsigned) if trust.allow_unsigned => None,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("manifest of image {id:?}"))
                .context(ExitKind::Untrusted)
        }
    };
    parse_verified(id, stored, sig, signed_by)
}

/// Decompress and parse bytes whose signature was checked.
fn parse_verified(
    id: &str,
    stored: Vec<u8>,
    sig: Option<Vec<u8>>,
    signed_by: Option<String>,
) -> Result<Resolved> {
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
