//! What one download may cost: the `[fetch]` table of the configuration.
//!
//! ```toml
//! [fetch]
//! low_speed_bytes = 1024        # fewer than this many bytes ...
//! low_speed_secs = 60           # ... in this many seconds: the request failed (retried)
//! deadline_secs = 3600          # no request may take longer (retried)
//! max_manifest_bytes = 16777216 # largest stored (compressed) manifest accepted
//! max_pack_index_bytes = 16777216 # largest stored pack index accepted
//! ```
//!
//! Every other body is bounded by what signed metadata declares (an object
//! by its size, a pack span by its index, a delta by its header), or by a
//! fixed constant (the store marker and signatures, see
//! [`crate::net::fetch`]). A body longer than its bound is refused
//! (exit 4); a slow or stalled one is retried with the usual backoff. All
//! of it happens in the fetch step, before staging and long before the
//! quiesce window, so a slow server delays an update but never lengthens
//! the services' downtime.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Default of `low_speed_bytes`: a request that receives fewer bytes than
/// this in `low_speed_secs` is aborted (TUF's slow-retrieval defence).
pub const DEFAULT_LOW_SPEED_BYTES: u64 = 1024;
/// Default of `low_speed_secs`, in seconds; also the longest wait for
/// response headers and for any single read.
pub const DEFAULT_LOW_SPEED_SECS: u64 = 60;
/// Default of `deadline_secs`: the longest one request may take, in seconds.
pub const DEFAULT_DEADLINE_SECS: u64 = 3600;
/// Default of `max_manifest_bytes`: the largest stored (zstd) manifest
/// accepted, in bytes (16 MiB holds some 300,000 entries).
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// Default of `max_pack_index_bytes`: the largest stored pack index
/// accepted, in bytes (about 40 bytes per object).
pub const DEFAULT_MAX_PACK_INDEX_BYTES: u64 = 16 << 20;

/// Bounds on every HTTP request of an update (the `[fetch]` table).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FetchLimits {
    /// Fewer bytes than this in [`Self::low_speed_secs`] abort a request.
    pub low_speed_bytes: u64,
    /// The low-speed window, in seconds (at least 1); also the longest wait
    /// for headers or for a single read.
    pub low_speed_secs: u64,
    /// The longest one request may take, in seconds (at least 1).
    pub deadline_secs: u64,
    /// The largest stored manifest accepted, in bytes.
    pub max_manifest_bytes: u64,
    /// The largest stored pack index accepted, in bytes.
    pub max_pack_index_bytes: u64,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            low_speed_bytes: DEFAULT_LOW_SPEED_BYTES,
            low_speed_secs: DEFAULT_LOW_SPEED_SECS,
            deadline_secs: DEFAULT_DEADLINE_SECS,
            max_manifest_bytes: DEFAULT_MAX_MANIFEST_BYTES,
            max_pack_index_bytes: DEFAULT_MAX_PACK_INDEX_BYTES,
        }
    }
}

/// The `[fetch]` table of one configuration fragment: every key optional.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub struct FetchFragment {
    low_speed_bytes: Option<u64>,
    low_speed_secs: Option<u64>,
    deadline_secs: Option<u64>,
    max_manifest_bytes: Option<u64>,
    max_pack_index_bytes: Option<u64>,
}

impl FetchLimits {
    /// Apply one fragment's keys over `self`.
    pub fn merge(&mut self, f: FetchFragment) -> Result<()> {
        for (name, v) in [
            ("low_speed_secs", f.low_speed_secs),
            ("deadline_secs", f.deadline_secs),
            ("max_manifest_bytes", f.max_manifest_bytes),
            ("max_pack_index_bytes", f.max_pack_index_bytes),
        ] {
            if v == Some(0) {
                bail!("{name} must be at least 1");
            }
        }
        let FetchFragment {
            low_speed_bytes,
            low_speed_secs,
            deadline_secs,
            max_manifest_bytes,
            max_pack_index_bytes,
        } = f;
        for (have, v) in [
            (&mut self.low_speed_bytes, low_speed_bytes),
            (&mut self.low_speed_secs, low_speed_secs),
            (&mut self.deadline_secs, deadline_secs),
            (&mut self.max_manifest_bytes, max_manifest_bytes),
            (&mut self.max_pack_index_bytes, max_pack_index_bytes),
        ] {
            if let Some(v) = v {
                *have = v;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_overrides_key_by_key_and_refuses_zero() {
        let mut l = FetchLimits::default();
        let f: FetchFragment =
            toml::from_str("low_speed_secs = 5\nmax_manifest_bytes = 99").unwrap();
        l.merge(f).unwrap();
        assert_eq!(l.low_speed_secs, 5);
        assert_eq!(l.max_manifest_bytes, 99);
        assert_eq!(l.deadline_secs, DEFAULT_DEADLINE_SECS);
        let f: FetchFragment = toml::from_str("deadline_secs = 0").unwrap();
        assert!(l.merge(f).is_err());
        assert!(toml::from_str::<FetchFragment>("nope = 1").is_err());
    }
}
