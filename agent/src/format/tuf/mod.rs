//! Trust metadata of a store, after TUF (the rules cited are TUF 1.0's
//! client workflow, §5.3–5.4): a k-of-n **root** that names the keys of
//! every role and rotates by a chain of versions, and a short-lived
//! **timestamp** (our index) that lists each image's manifest by digest and
//! length, versioned so a node never goes back to an older one.
//!
//! Written here rather than taken from the `tough` crate: tough brings
//! about 120 crates (a second reqwest, aws-lc) to a 2-core build, its
//! transport is async where our fetch is blocking, and our objects are
//! already verified by the manifest, so only the root and timestamp roles
//! are needed; the manifests are the targets. Each TUF rule we rely on has
//! a unit test named after it.
//!
//! Pure: bytes and the start time in, verdicts out. Fetching the chain and
//! keeping the node's state are the caller's ([`crate::engine::trust_state`]).

pub mod envelope;
pub mod root;
pub mod timestamp;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

pub use envelope::Envelope;
pub use root::Root;
pub use timestamp::{Listing, Timestamp};

/// Public keys by key id.
pub type Keys = BTreeMap<String, VerifyingKey>;

/// The keys of one role and how many of them must sign.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Key ids (each must be in the root's `keys`).
    pub keyids: BTreeSet<String>,
    /// Distinct valid signatures needed (≥ 1).
    pub threshold: u32,
}

/// Why trust metadata is refused. Every variant maps to exit 4.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TufError {
    /// Not an envelope or payload we can read.
    #[error("malformed trust metadata: {0}")]
    Malformed(String),
    /// An envelope of another kind (a root offered as a timestamp).
    #[error("trust metadata of type {got:?} where {want:?} was expected")]
    WrongKind {
        /// Expected payload type.
        want: String,
        /// Found payload type.
        got: String,
    },
    /// Too few distinct valid signatures.
    #[error("{what}: {valid} valid signature(s) of its role's keys, {threshold} required")]
    Threshold {
        /// Which metadata.
        what: String,
        /// Distinct valid signatures found.
        valid: usize,
        /// Required.
        threshold: u32,
    },
    /// A version that does not follow (root) or goes back (timestamp).
    #[error("{what}: version {got}, expected {want}")]
    Version {
        /// Which metadata.
        what: String,
        /// Version expected (root: exactly; timestamp: at least).
        want: u64,
        /// Version found.
        got: u64,
    },
    /// Past its expiry at the start of this run (TUF fixes the time once).
    #[error("{what} expired at {expires}")]
    Expired {
        /// Which metadata.
        what: String,
        /// Its expiry, RFC 3339.
        expires: String,
    },
    /// The image is not listed, or listed with other bytes.
    #[error("{0}")]
    NotListed(String),
}

/// Parse an RFC 3339 time to Unix seconds.
pub fn parse_time(s: &str) -> Result<i64, TufError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| TufError::Malformed(format!("time {s:?}: {e}")))
}

/// Format Unix seconds as RFC 3339 (UTC).
pub fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// Refuse metadata whose `expires` is not after `now` (Unix seconds).
fn check_expiry(what: &str, expires: &str, now: i64) -> Result<(), TufError> {
    if parse_time(expires)? <= now {
        return Err(TufError::Expired {
            what: what.into(),
            expires: expires.into(),
        });
    }
    Ok(())
}
