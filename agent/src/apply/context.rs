//! What every step of an apply shares: the run's context and its live
//! status, the phase stopwatch, and the guard that makes the root
//! read-only again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use super::{ApplyOptions, ApplyReport};
use crate::engine::config::Config;
use crate::engine::lifecycle::{Event, Lifecycle, Phase};
use crate::engine::remount;
use crate::engine::status::Status;
use crate::fs::rootfs::RootFs;
use crate::fs::stamps::{self, StampSum};
use crate::sys::error::ExitKind;
use crate::sys::progress::Progress;

/// Intermediate phases reach the live status file at most this often, in
/// ms: every write is a file creation and rename on the runtime directory,
/// and a quick update should not pay for half a dozen of them.
const STATUS_EVERY_MS: u128 = 1000;

pub(super) struct Ctx<'a> {
    pub(super) opts: &'a ApplyOptions,
    pub(super) cfg: Config,
    pub(super) root: RootFs,
    pub(super) progress: &'a Progress,
    pub(super) lifecycle: Lifecycle,
    pub(super) status: Status,
    /// When the live status was last written.
    pub(super) status_saved: Option<Instant>,
}

impl<'a> Ctx<'a> {
    /// A run that has not started: the live status says idle.
    pub(super) fn new(
        opts: &'a ApplyOptions,
        cfg: Config,
        root: RootFs,
        progress: &'a Progress,
    ) -> Result<Self> {
        let status = Status {
            phase: Phase::Idle,
            current: root.image_id()?,
            target: opts.id.clone(),
            source: opts.from.clone(),
            result: "in-progress".into(),
            last_error: None,
            reboot_required: false,
            reboot_reason: None,
            phases_ms: BTreeMap::new(),
            quiesce_ms: None,
            total_ms: None,
            download: None,
            updated: crate::sys::clock::now_rfc3339(),
            pid: std::process::id(),
        };
        Ok(Ctx {
            opts,
            cfg,
            root,
            progress,
            lifecycle: Lifecycle::new(),
            status,
            status_saved: None,
        })
    }
}

impl Ctx<'_> {
    /// Take a lifecycle step. The live status file is written when the
    /// update starts, when services are about to be quiesced (what an
    /// operator looking at a node most needs to see), and otherwise at
    /// most every [`STATUS_EVERY_MS`]; the final state is always written by
    /// [`super::run`].
    pub(super) fn advance(&mut self, ev: Event) {
        match self.lifecycle.advance(ev) {
            Ok(p) => {
                self.progress.phase(p.as_str());
                self.status.phase = p;
                self.status.updated = crate::sys::clock::now_rfc3339();
                let due = matches!(ev, Event::Planned | Event::Quiesced)
                    || self
                        .status_saved
                        .is_none_or(|t| t.elapsed().as_millis() >= STATUS_EVERY_MS);
                if !self.opts.dry_run && due && !ev.is_terminal() {
                    self.status_saved = Some(Instant::now());
                    if let Err(e) = self.status.save(&self.root.runtime_dir()) {
                        tracing::warn!("could not write live status: {e:#}");
                    }
                }
            }
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// The final status of a run that was not a dry run.
    pub(super) fn record_outcome(&mut self, res: &Result<ApplyReport>) {
        let rt = self.root.runtime_dir();
        match res {
            Ok(r) => {
                self.status.result = r.result.clone();
                self.status.phases_ms = r.phases.clone();
                self.status.quiesce_ms = r.quiesce_ms;
                self.status.total_ms = Some(r.total_ms);
                self.status.download = r.download.clone();
                self.status.current = self.root.image_id().ok().flatten();
                self.status.reboot_required = r.kernel.changed;
                self.status.reboot_reason = r.kernel.reason.clone();
                if self.lifecycle.phase() == Phase::Resumed {
                    let ev = if r.kernel.changed {
                        Event::KernelChanged
                    } else {
                        Event::Reset
                    };
                    self.advance(ev);
                } else if self.lifecycle.phase() == Phase::Planned {
                    self.advance(Event::NothingToDo);
                }
            }
            Err(e) => {
                self.status.result = if ExitKind::of(e) == ExitKind::PostApplyHook {
                    "failed-committed"
                } else {
                    "failed"
                }
                .into();
                self.status.last_error = Some(format!("{e:#}"));
                self.status.current = self.root.image_id().ok().flatten();
                if self.lifecycle.phase() != Phase::Idle {
                    self.advance(Event::Failed);
                }
            }
        }
        self.status.updated = crate::sys::clock::now_rfc3339();
        if let Err(e) = self.status.save(&rt) {
            tracing::warn!("could not write status: {e:#}");
        }
    }
}

/// Phase stopwatch.
pub(super) struct Clock {
    start: Instant,
    mark: Instant,
    phases: BTreeMap<String, u64>,
}

impl Clock {
    pub(super) fn new() -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            mark: now,
            phases: BTreeMap::new(),
        }
    }

    pub(super) fn lap(&mut self, name: &str) {
        let now = Instant::now();
        *self.phases.entry(name.to_string()).or_default() += (now - self.mark).as_millis() as u64;
        self.mark = now;
    }

    /// The report of a run that ends here with `result`.
    pub(super) fn finish(self, mut report: ApplyReport, result: &str) -> ApplyReport {
        report.phases = self.phases;
        report.total_ms = self.start.elapsed().as_millis() as u64;
        report.result = result.into();
        report
    }
}

/// Remounts the root read-only again when dropped, if we made it writable.
pub(super) struct RwGuard {
    pub(super) mount_point: Option<PathBuf>,
}

impl RwGuard {
    pub(super) fn restore(&mut self) -> Result<()> {
        if let Some(mp) = self.mount_point.take() {
            remount::remount(&mp, false)?;
        }
        Ok(())
    }
}

impl Drop for RwGuard {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            tracing::error!("could not remount the root read-only again: {e:#}");
        }
    }
}

/// Store the walk's stamps for the next run unless they are what was
/// loaded. Best effort: the cache only saves time (a read-only root, say,
/// keeps the old one, which stays correct).
pub(super) fn refresh_stamps(
    state: std::os::fd::BorrowedFd<'_>,
    old: Option<&StampSum>,
    new: Option<&[u8]>,
) {
    let Some(new) = new else { return };
    if old.is_some_and(|o| o.same_as(new)) {
        return;
    }
    if let Err(e) = stamps::save(state, new) {
        tracing::debug!("could not store the stamp cache: {e}");
    }
}
