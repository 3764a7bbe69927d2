//! The signed index of a store (TUF's timestamp and snapshot in one, our
//! store being small): a version that only grows, a short expiry, and each
//! image's manifest by sha256 and length, with its channel and release.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{check_expiry, Envelope, Root, TufError};
use crate::format::manifest::Digest;

/// Kind name of timestamp envelopes.
pub const KIND: &str = "timestamp";
/// File name in the store.
pub const FILE_NAME: &str = "timestamp.json";

/// One image's manifest as the index lists it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Listing {
    /// sha256 of the stored `manifest.json.zst`, hex.
    pub sha256: String,
    /// Its length, in bytes (also the node's download cap for it).
    pub length: u64,
    /// The manifest's channel.
    pub channel: String,
    /// The manifest's release on that channel.
    pub release: u64,
}

/// The index as written (the envelope's payload).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Timestamp {
    /// Always `timestamp`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Grows by one at every publish or refresh.
    pub version: u64,
    /// When it was signed, RFC 3339 (the node reports its age).
    pub issued: String,
    /// RFC 3339.
    pub expires: String,
    /// Every image of the store, by id.
    pub images: BTreeMap<String, Listing>,
}

impl Listing {
    /// Whether `stored` are the listed bytes.
    pub fn matches(&self, stored: &[u8]) -> bool {
        stored.len() as u64 == self.length && Digest::of(stored).to_hex() == self.sha256
    }
}

impl Timestamp {
    /// Verify an index against the trusted root and the highest version
    /// this node has seen (TUF 5.4.2–5.4.3: a threshold of the timestamp
    /// keys, and never an older version; the same one is fine). Expiry is
    /// left to [`Timestamp::check_fresh`], whose verdict the node's policy
    /// weighs.
    pub fn verify(bytes: &[u8], root: &Root, seen: Option<u64>) -> Result<Timestamp, TufError> {
        let env = Envelope::parse(bytes)?;
        let payload = env.payload_of(KIND)?;
        env.verify(
            "the store's index (timestamp.json)",
            &root.keys,
            root.role(KIND),
        )?;
        let ts: Timestamp = serde_json::from_slice(&payload)
            .map_err(|e| TufError::Malformed(format!("timestamp: {e}")))?;
        if ts.kind != KIND {
            return Err(TufError::Malformed(format!(
                "timestamp: type {:?}",
                ts.kind
            )));
        }
        super::parse_time(&ts.expires)?;
        super::parse_time(&ts.issued)?;
        if let Some(s) = seen {
            if ts.version < s {
                return Err(TufError::Version {
                    what: "the store's index (an older one than this node has seen: replayed?)"
                        .into(),
                    want: s,
                    got: ts.version,
                });
            }
        }
        Ok(ts)
    }

    /// Refuse an index past its expiry at `now` (Unix seconds).
    pub fn check_fresh(&self, now: i64) -> Result<(), TufError> {
        check_expiry(
            &format!("the store's index v{}", self.version),
            &self.expires,
            now,
        )
    }

    /// The listing of image `id`, which must match `stored` (TUF's
    /// snapshot check against mix-and-match).
    pub fn check_listed(&self, id: &str, stored: &[u8]) -> Result<&Listing, TufError> {
        let l = self.images.get(id).ok_or_else(|| {
            TufError::NotListed(format!("image {id:?} is not in the store's signed index"))
        })?;
        if !l.matches(stored) {
            return Err(TufError::NotListed(format!(
                "the manifest of {id:?} is not the one the signed index lists ({} bytes, sha256 {})",
                l.length, l.sha256
            )));
        }
        Ok(l)
    }

    /// The highest release listed on `channel`, with its image.
    pub fn newest_on(&self, channel: &str) -> Option<(&str, u64)> {
        self.images
            .iter()
            .filter(|(_, l)| l.channel == channel)
            .max_by_key(|(_, l)| l.release)
            .map(|(id, l)| (id.as_str(), l.release))
    }
}
