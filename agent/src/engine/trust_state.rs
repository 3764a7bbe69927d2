//! The node's memory of its store's trust metadata
//! (`var/lib/imageupd/trust.json`): the newest root it verified (so a
//! rotation, once seen, cannot be undone by an older image's anchor) and
//! the highest index version it accepted (so an older index is never taken
//! again). Written durably; a file that does not parse is an error, never
//! "nothing seen".

use std::os::fd::BorrowedFd;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::format::manifest::RelPath;
use crate::fs::fsx;

/// File name in the state directory.
pub const TRUST_NAME: &[u8] = b"trust.json";
/// Format of [`TRUST_NAME`].
const TRUST_FORMAT: u32 = 1;

/// What the node has verified so far.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustState {
    /// Always [`TRUST_FORMAT`].
    pub format: u32,
    /// The newest verified root envelope, as stored.
    pub root: Option<String>,
    /// Highest index (timestamp) version accepted; reset when the
    /// timestamp keys rotate.
    pub index_version: Option<u64>,
}

/// The node's state; nothing yet is the default.
pub fn load(state: BorrowedFd<'_>) -> Result<TrustState> {
    match fsx::read_beneath(state, &RelPath(TRUST_NAME.to_vec())) {
        Ok(b) => serde_json::from_slice(&b).context(
            "var/lib/imageupd/trust.json (the store's trust metadata this node has seen) is corrupt; refusing to guess",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TrustState {
            format: TRUST_FORMAT,
            ..Default::default()
        }),
        Err(e) => Err(e).context("reading var/lib/imageupd/trust.json"),
    }
}

/// Durably store the state (temp file, fsync, rename, directory fsync).
pub fn save(state: BorrowedFd<'_>, t: &TrustState) -> Result<()> {
    let mut t = t.clone();
    t.format = TRUST_FORMAT;
    let bytes = serde_json::to_vec_pretty(&t)?;
    fsx::write_atomic(state, TRUST_NAME, &bytes, 0o644)
        .context("writing var/lib/imageupd/trust.json")
}
