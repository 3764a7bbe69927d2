//! Signed envelopes for the store's trust metadata (`root`, `timestamp`):
//! DSSE (the envelope in-toto and Sigstore use). The payload is carried as
//! exact bytes (base64), and each signature covers the DSSE
//! pre-authentication encoding of the payload type and those bytes, so no
//! canonical JSON is needed and a root can never be replayed as a
//! timestamp. Pure: bytes in, bytes out.

use std::collections::BTreeSet;

use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey};
use serde::{Deserialize, Serialize};

use super::{Keys, Role, TufError};
use crate::format::sign::key_id;

/// Largest envelope accepted, in bytes (TUF's default limit for root and
/// timestamp metadata is 1 MiB).
pub const MAX_ENVELOPE_BYTES: usize = 1 << 20;

/// A DSSE envelope as stored.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Envelope {
    /// `application/vnd.imageupd.<kind>+json`.
    pub payload_type: String,
    /// Base64 of the payload bytes.
    pub payload: String,
    /// Signatures over the pre-authentication encoding.
    pub signatures: Vec<EnvSig>,
}

/// One signature of an envelope.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvSig {
    /// Short id of the signing key ([`key_id`]).
    pub keyid: String,
    /// Base64 ed25519 signature.
    pub sig: String,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// The payload type of a metadata kind.
pub fn payload_type(kind: &str) -> String {
    format!("application/vnd.imageupd.{kind}+json")
}

/// DSSE's pre-authentication encoding: what every signature covers.
fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    v.extend_from_slice(payload);
    v
}

impl Envelope {
    /// A new envelope with no signatures yet.
    pub fn new(kind: &str, payload: &[u8]) -> Envelope {
        Envelope {
            payload_type: payload_type(kind),
            payload: b64().encode(payload),
            signatures: Vec::new(),
        }
    }

    /// Parse stored bytes (bounded).
    pub fn parse(bytes: &[u8]) -> Result<Envelope, TufError> {
        if bytes.len() > MAX_ENVELOPE_BYTES {
            return Err(TufError::Malformed(format!(
                "{} bytes, more than the {MAX_ENVELOPE_BYTES}-byte limit",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| TufError::Malformed(e.to_string()))
    }

    /// Stored bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// The payload bytes, after checking the kind. Unverified: call
    /// [`Envelope::verify`] before trusting them.
    pub fn payload_of(&self, kind: &str) -> Result<Vec<u8>, TufError> {
        if self.payload_type != payload_type(kind) {
            return Err(TufError::WrongKind {
                want: payload_type(kind),
                got: self.payload_type.clone(),
            });
        }
        b64()
            .decode(&self.payload)
            .map_err(|e| TufError::Malformed(format!("payload: {e}")))
    }

    /// Add (or replace) the signature of `key`.
    pub fn sign(&mut self, key: &SigningKey) -> Result<(), TufError> {
        let payload = b64()
            .decode(&self.payload)
            .map_err(|e| TufError::Malformed(format!("payload: {e}")))?;
        let id = key_id(&key.verifying_key());
        let sig = key.sign(&pae(&self.payload_type, &payload));
        self.signatures.retain(|s| s.keyid != id);
        self.signatures.push(EnvSig {
            keyid: id,
            sig: b64().encode(sig.to_bytes()),
        });
        Ok(())
    }

    /// The distinct keys of `role` (from `keys`) whose signature verifies;
    /// a key id counts once however often it signs (TUF 5.3.4).
    pub fn valid_signers(&self, keys: &Keys, role: &Role) -> BTreeSet<String> {
        let Ok(payload) = b64().decode(&self.payload) else {
            return BTreeSet::new();
        };
        let msg = pae(&self.payload_type, &payload);
        let mut ok = BTreeSet::new();
        for s in &self.signatures {
            if !role.keyids.contains(&s.keyid) || ok.contains(&s.keyid) {
                continue;
            }
            let Some(k) = keys.get(&s.keyid) else {
                continue;
            };
            let Ok(raw) = b64().decode(&s.sig) else {
                continue;
            };
            let Ok(raw) = <[u8; 64]>::try_from(raw.as_slice()) else {
                continue;
            };
            if k.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(&raw))
                .is_ok()
            {
                ok.insert(s.keyid.clone());
            }
        }
        ok
    }

    /// Check that at least `role.threshold` distinct keys of `role` signed.
    pub fn verify(&self, what: &str, keys: &Keys, role: &Role) -> Result<(), TufError> {
        let n = self.valid_signers(keys, role).len();
        if n < role.threshold as usize {
            return Err(TufError::Threshold {
                what: what.into(),
                valid: n,
                threshold: role.threshold,
            });
        }
        Ok(())
    }
}
