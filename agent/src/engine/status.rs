//! Live and last status of a root, for `imageupd status` and for the agent.
//!
//! The live record sits in the runtime directory (always writable, even when
//! the root is read-only); the last result is also kept in the state
//! directory so it survives a reboot.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::lifecycle::Phase;

/// File name of the status record.
pub const STATUS_NAME: &str = "status.json";

/// The status record.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Status {
    /// Lifecycle phase.
    pub phase: Phase,
    /// Image the root matches (`etc/image_id`).
    pub current: Option<String>,
    /// Image being applied, or last applied/attempted.
    pub target: Option<String>,
    /// Where it came from.
    pub source: Option<String>,
    /// "applied", "nothing-to-do", "failed", "aborted", or "in-progress".
    pub result: String,
    /// Last error, if the last attempt failed.
    pub last_error: Option<String>,
    /// The node must boot another kernel to complete the update.
    pub reboot_required: bool,
    /// Why.
    pub reboot_reason: Option<String>,
    /// Duration of each phase of the last attempt, ms.
    pub phases_ms: BTreeMap<String, u64>,
    /// Quiesce window of the last attempt (pre-apply start to post-apply start), ms.
    pub quiesce_ms: Option<u64>,
    /// Total wall time of the last attempt that finished, ms.
    #[serde(default)]
    pub total_ms: Option<u64>,
    /// What the last attempt fetched over HTTP(S); absent for local
    /// sources and in records written before this field.
    #[serde(default)]
    pub download: Option<crate::net::fetch::DownloadReport>,
    /// RFC 3339 time of this record.
    pub updated: String,
    /// Process that wrote it.
    pub pid: u32,
}

impl Status {
    /// Write atomically into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        crate::fs::store::write_volatile(&dir.join(STATUS_NAME), &serde_json::to_vec_pretty(self)?)
    }

    /// Read from `dir` if present.
    pub fn load(dir: &Path) -> Result<Option<Status>> {
        match std::fs::read(dir.join(STATUS_NAME)) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
                format!("parsing {}", dir.join(STATUS_NAME).display())
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("reading {}", dir.join(STATUS_NAME).display()))
            }
        }
    }
}
