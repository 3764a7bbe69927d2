//! The apply journal: one small JSON record in the state directory that
//! says an update is under way, toward which image, from where, and whether
//! the root was remounted read-write for it.
//!
//! Recovery does not replay operations: every swap step is atomic per path
//! and the plan is recomputed from the root's actual state, so the next run
//! simply converges toward the journal's target and clears the staging area.

use std::os::fd::BorrowedFd;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fs::fsx;

/// File name of the journal in the state directory.
pub const JOURNAL_NAME: &[u8] = b"journal.json";

/// Where an update stands.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JournalPhase {
    /// Content is being staged; the root is still wholly old.
    Staging,
    /// Renames are under way; paths are each wholly old or wholly new.
    Swapping,
    /// The root matches the target.
    Committed,
    /// Stopped before the swap; the root is wholly old.
    Aborted,
}

/// The journal record.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Journal {
    /// Target image id.
    pub target: String,
    /// Image id the root had when the update started.
    pub from: Option<String>,
    /// The `--from` location, for resuming without arguments.
    pub source: String,
    /// Phase.
    pub phase: JournalPhase,
    /// The root was read-only and imageupd remounted it read-write.
    #[serde(default)]
    pub remounted_rw: bool,
    /// RFC 3339 start time.
    pub started: String,
    /// RFC 3339 time of the last phase change.
    pub updated: String,
}

impl Journal {
    /// Read the journal from the state directory, if any.
    pub fn load(state: BorrowedFd<'_>) -> Result<Option<Journal>> {
        let bytes = match fsx::read_beneath(
            state,
            &crate::format::manifest::RelPath(JOURNAL_NAME.to_vec()),
        ) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context("reading the apply journal"),
        };
        // A torn journal cannot happen (atomic writes), but a hand-edited one
        // can: report it rather than guess.
        serde_json::from_slice(&bytes).map(Some).context(
            "the apply journal var/lib/imageupd/journal.json is corrupt; remove it to continue",
        )
    }

    /// Durably record the journal: temp file, fsync, rename, fsync of the
    /// directory. Never without the fsyncs: a journal renamed into place
    /// before its bytes are on disk reads back empty after a power cut.
    pub fn store(&mut self, state: BorrowedFd<'_>, phase: JournalPhase) -> Result<()> {
        self.phase = phase;
        self.updated = crate::sys::clock::now_rfc3339();
        let bytes = serde_json::to_vec_pretty(self)?;
        fsx::write_atomic(state, JOURNAL_NAME, &bytes, 0o644).context("writing the apply journal")
    }

    /// True when an earlier run stopped mid-way.
    pub fn interrupted(&self) -> bool {
        matches!(self.phase, JournalPhase::Staging | JournalPhase::Swapping)
    }
}
