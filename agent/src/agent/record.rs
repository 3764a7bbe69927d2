//! The agent's record of what it applied and what failed (`agent.json` in
//! the runtime directory, next to the live status).

use std::path::Path;
use std::time::SystemTime;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::agent::metadata::Snapshot;
use crate::sys::backoff::{epoch_ms, FailureBook};

/// File name of the record, in the root's runtime directory.
pub const RECORD_NAME: &str = "agent.json";
/// Lock serialising updates of the record (held for milliseconds).
pub(super) const RECORD_LOCK: &str = "agent.json.lock";

/// The last committed update made from metadata.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Applied {
    /// Image applied.
    pub id: String,
    /// Image the root had before.
    pub from: Option<String>,
    /// Where it came from.
    pub source: String,
    /// When the commit happened (before the post-apply hooks), epoch ms.
    pub committed_ms: u64,
    /// When the metadata naming `id` was written (newest file mtime), epoch ms.
    pub metadata_changed_ms: Option<u64>,
    /// From that metadata write to the commit, ms: the end-to-end latency.
    pub metadata_to_commit_ms: Option<u64>,
    /// The apply's own wall time, ms.
    pub apply_ms: u64,
    /// Its quiesce window, ms.
    pub quiesce_ms: Option<u64>,
    /// Its phase durations, ms.
    pub phases_ms: std::collections::BTreeMap<String, u64>,
    /// The apply committed but a post-apply hook failed.
    pub post_apply_failed: bool,
    /// What it fetched over HTTP(S) (bytes, requests, objects), when the
    /// source was a URL; absent in records written before this field.
    #[serde(default)]
    pub download: Option<crate::net::fetch::DownloadReport>,
    /// Its walk of the root (`apply --json`'s `walk`): full or tracked, and
    /// why change tracking fell back to a full walk; absent in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub walk: Option<serde_json::Value>,
}

/// What the agent and `apply --from-metadata` know, for `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentRecord {
    /// Pid of the running agent, if one runs.
    pub agent_pid: Option<u32>,
    /// `watching`, `applying`, `backing-off`, `metadata-error`, `stopping`,
    /// `stopped` (agent), or `cli` after an `apply --from-metadata`.
    pub state: String,
    /// The metadata source, described.
    pub metadata_source: String,
    /// Why the metadata could not be used last time, if it could not.
    pub metadata_error: Option<String>,
    /// Image the metadata asks for.
    pub wanted: Option<String>,
    /// Source the metadata (or the configured default) names.
    pub wanted_source: Option<String>,
    /// When the metadata asking for `wanted` was written, epoch ms.
    pub metadata_changed_ms: Option<u64>,
    /// When it was first read, epoch ms.
    pub metadata_seen_ms: Option<u64>,
    /// Last result: `applied`, `nothing-to-do`, `failed`, `failed-committed`,
    /// `stopped`.
    pub last_result: Option<String>,
    /// Last error of an update attempt (kept until an update succeeds).
    pub last_error: Option<String>,
    /// The last committed update.
    pub last_applied: Option<Applied>,
    /// Failed targets and their next retry.
    pub failures: FailureBook,
    /// When this record was written, epoch ms.
    pub updated_ms: u64,
}

impl AgentRecord {
    /// Read the record of the runtime directory `dir` (empty if none).
    pub fn load(dir: &Path) -> Result<AgentRecord> {
        let p = dir.join(RECORD_NAME);
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AgentRecord::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Read, change and write the record atomically with respect to other
    /// writers (the agent and `apply --from-metadata`).
    pub fn update<T>(dir: &Path, f: impl FnOnce(&mut AgentRecord) -> T) -> Result<T> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let lp = dir.join(RECORD_LOCK);
        let lf = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lp)
            .with_context(|| format!("opening {}", lp.display()))?;
        let _guard = nix::fcntl::Flock::lock(lf, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow!("locking {}: {e}", lp.display()))?;
        // A corrupt record (hand-edited) is replaced rather than blocking.
        let mut r = AgentRecord::load(dir).unwrap_or_default();
        let out = f(&mut r);
        r.updated_ms = epoch_ms(SystemTime::now());
        crate::fs::store::write_atomic(&dir.join(RECORD_NAME), &serde_json::to_vec_pretty(&r)?)?;
        Ok(out)
    }

    /// Note that the metadata asks for `id` from `source`; the change time
    /// is kept from the first read that saw this id.
    pub(super) fn saw(&mut self, id: &str, source: &str, snap: &Snapshot) {
        if self.wanted.as_deref() != Some(id) {
            self.wanted = Some(id.to_owned());
            self.metadata_changed_ms = snap.changed_at.map(epoch_ms);
            self.metadata_seen_ms = Some(epoch_ms(SystemTime::now()));
        }
        self.wanted_source = Some(source.to_owned());
        self.metadata_error = None;
    }
}
