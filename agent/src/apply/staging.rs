//! Steps "fetch", "stage" and "sync": with the root writable and the
//! journal open, download and stage the new content while services run,
//! then make it durable. Every stop here leaves the root as it was.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{anyhow, Context, Result};

use super::context::{refresh_stamps, Ctx, RwGuard};
use super::resolve::Target;
use super::survey::Survey;
use super::ApplyReport;
use crate::engine::journal::{Journal, JournalPhase};
use crate::engine::lifecycle::Event;
use crate::engine::record::write_next_record;
use crate::engine::remount::{self, MountInfo};
use crate::engine::stage::{self, Staging};
use crate::engine::swap::{self, NewTrees};
use crate::fs::fsx;
use crate::sys::fault;

/// A run past its preflight: the root writable, the journal begun.
pub(super) struct Begun {
    /// The staging directory, once prepared.
    pub(super) staging: Option<Staging>,
    /// The journal of this update.
    pub(super) journal: Journal,
    /// The state directory.
    pub(super) state: OwnedFd,
    /// This run converges an interrupted one.
    resuming: bool,
    /// The root's mount.
    pub(super) mount: Option<MountInfo>,
    /// Makes the root read-only again (dropped last).
    pub(super) rw: RwGuard,
}

/// What staging produced besides the staging directory.
pub(super) struct Assembled {
    /// Staged names by object.
    pub(super) names: stage::StagedNames,
    /// New directory trees put together in staging.
    pub(super) trees: NewTrees,
}

impl Begun {
    /// Make the root writable (remembering to undo it), even when resuming
    /// a run that died while it was writable; open the journal and remove
    /// staging leftovers.
    pub(super) fn begin(ctx: &Ctx<'_>, t: &Target, report: &ApplyReport) -> Result<Begun> {
        let mut rw = RwGuard { mount_point: None };
        let mount = remount::find(&ctx.root.path)?;
        let was_remounted = t.interrupted.as_ref().is_some_and(|j| j.remounted_rw);
        if let Some(m) = &mount {
            if m.read_only() {
                remount::remount(&m.mount_point, true).context(
                    "the root is read-only and could not be made writable; nothing was changed",
                )?;
                rw.mount_point = Some(m.mount_point.clone());
            } else if was_remounted {
                rw.mount_point = Some(m.mount_point.clone());
            }
        }
        let state = ctx.root.ensure_state_dir()?;
        let mut journal = Journal {
            target: t.id.clone(),
            from: report.from_id.clone(),
            source: t.source.location(),
            phase: JournalPhase::Staging,
            remounted_rw: rw.mount_point.is_some(),
            started: crate::sys::clock::now_rfc3339(),
            updated: String::new(),
        };
        let removed = stage::cleanup(ctx.root.fd(), ctx.root.dev)?;
        if removed > 0 {
            ctx.progress.line(&format!(
                "removed {removed} staging leftovers of an interrupted run"
            ));
        }
        // Durable (fsync before and after the rename): a journal renamed into
        // place without its bytes reads back empty after a power cut (xfs,
        // ext4 noauto_da_alloc), and an unreadable journal stops every later
        // run (tests/powerloss.rs).
        journal.store(state.as_fd(), JournalPhase::Staging)?;
        fault::point("after-journal-begin");
        Ok(Begun {
            rw,
            mount,
            state,
            journal,
            resuming: t.interrupted.is_some(),
            staging: None,
        })
    }

    /// Download what the plan needs (remote sources).
    pub(super) fn fetch(
        &mut self,
        ctx: &mut Ctx<'_>,
        t: &Target,
        s: &Survey,
        report: &mut ApplyReport,
    ) -> Result<()> {
        if let Err(e) = t
            .source
            .prefetch(&s.plan.fetch, self.state.as_fd(), ctx.progress)
        {
            return Err(self.abort(ctx, e));
        }
        report.download = t.source.download_report();
        Ok(())
    }

    /// Stage new content and put new directory trees together, while
    /// services run; write the new image's record (renamed at commit).
    pub(super) fn stage(
        &mut self,
        ctx: &mut Ctx<'_>,
        t: &Target,
        s: &Survey,
        report: &mut ApplyReport,
    ) -> Result<Assembled> {
        let target = t.manifest();
        let staging = stage::prepare(ctx.root.fd(), ctx.root.dev, self.state.as_fd())?;
        let staged = stage::stage(
            &s.plan,
            target,
            ctx.root.fd(),
            &staging,
            &t.source,
            ctx.progress,
            t.threads,
        );
        let staging = self.staging.insert(staging);
        let (names, stage_report) = match staged {
            Ok(v) => v,
            Err(e) => return Err(self.abort(ctx, e)),
        };
        report.stage = stage_report;
        let trees = match swap::assemble(&s.plan, target, ctx.root.fd(), staging, &names) {
            Ok(t) => t,
            Err(e) => return Err(self.abort(ctx, e)),
        };
        if let Err(e) = write_next_record(&self.state, &t.resolved) {
            return Err(self.abort(ctx, e));
        }
        fault::point("after-stage");
        Ok(Assembled { names, trees })
    }

    /// Between stage and swap: empty the keep area of an earlier update and,
    /// when the caller runs the health gate, fill it with what this swap
    /// replaces ([`crate::engine::keep`]); a rollback in place keeps its
    /// area (it reads from it) and adds nothing. Never fails the update:
    /// the area is a cache, and what it lacks a rollback fetches.
    pub(super) fn keep(&mut self, ctx: &Ctx<'_>, t: &Target, s: &Survey) {
        if t.source.is_keep() {
            return;
        }
        let state = self.state.as_fd();
        if !ctx.opts.keep_replaced {
            crate::engine::keep::drop_area(state);
            return;
        }
        let r = crate::engine::keep::fill(
            ctx.root.fd(),
            ctx.root.dev,
            state,
            &s.plan,
            &s.nodes,
            t.manifest(),
            &s.cur,
        );
        match r {
            Ok(k) => {
                tracing::info!(
                    "kept {} replaced objects ({} bytes, no copies) for a rollback in place{}",
                    k.objects,
                    k.bytes,
                    if k.unknown + k.failed > 0 {
                        format!(
                            "; {} unnamed and {} failed are not kept",
                            k.unknown, k.failed
                        )
                    } else {
                        String::new()
                    }
                );
            }
            Err(e) => tracing::warn!("nothing kept for a rollback in place: {e:#}"),
        }
    }

    /// Drop the spent download cache, keep the walk's stamps, record the
    /// journal ("swapping") durably and make the staged content durable
    /// with one syncfs; any failure takes the abort path.
    pub(super) fn sync(
        &mut self,
        ctx: &mut Ctx<'_>,
        t: &Target,
        s: &Survey,
        report: &mut ApplyReport,
    ) -> Result<()> {
        // Staged: the download cache is spent (outside the quiesce window).
        if let Err(e) = t.source.drop_cache(self.state.as_fd()) {
            report.warnings.push(format!("{e:#}"));
        }
        ctx.advance(Event::Staged);
        // What this run's walk read stays true for every inode the swap leaves
        // alone (the others get new ctimes and miss next time).
        refresh_stamps(
            self.state.as_fd(),
            s.stamps.as_ref(),
            s.new_stamps.as_deref(),
        );
        // The journal says "swapping" before the first rename: written
        // durably (its own fsyncs), then this syncfs makes the staged content
        // durable. A stop before the swap turns it into "aborted" (abort).
        if let Err(e) = self
            .journal
            .store(self.state.as_fd(), JournalPhase::Swapping)
        {
            return Err(self.abort(ctx, e));
        }
        // A failed syncfs means staged bytes may be lost: abort before any
        // rename, never retry and trust (the resume re-stages and re-hashes).
        if !fault::unsafe_skip(fault::SKIP_PRESYNC) {
            let synced = fault::io_error("eio-presync")
                .and_then(|()| fsx::syncfs(ctx.root.fd()))
                .context("syncfs before the swap (staged content may not be on disk)");
            if let Err(e) = synced {
                return Err(self.abort(ctx, e));
            }
        }
        fault::point("after-presync");
        Ok(())
    }

    /// Stop before the swap when asked to.
    pub(super) fn stop_if_cancelled(&mut self, ctx: &mut Ctx<'_>) -> Result<()> {
        if ctx.opts.cancelled() {
            let err = anyhow!("stopped on request after staging, before the swap");
            return Err(self.abort(ctx, err));
        }
        Ok(())
    }

    /// Undo everything of a run that stopped before the swap: close the
    /// staging directory (an open, deleted inode keeps a read-only remount
    /// busy) and remove it, mark the journal, restore read-only. The root is
    /// as it was.
    pub(super) fn abort(&mut self, ctx: &mut Ctx<'_>, err: anyhow::Error) -> anyhow::Error {
        drop(self.staging.take());
        let mut err = err;
        if let Err(e) = stage::cleanup(ctx.root.fd(), ctx.root.dev) {
            err = err.context(format!("(staging leftovers could not be removed: {e:#})"));
        }
        // A run resuming an interrupted swap must keep the journal open.
        let phase = if self.resuming {
            JournalPhase::Swapping
        } else {
            JournalPhase::Aborted
        };
        if let Err(e) = self.journal.store(self.state.as_fd(), phase) {
            err = err.context(format!("(journal not updated: {e:#})"));
        }
        if let Err(e) = self.rw.restore() {
            err = err.context(format!(
                "(the root could not be made read-only again: {e:#})"
            ));
        }
        let msg = if self.resuming {
            "the update stopped before the swap; the root is as the interrupted run left it"
                .to_string()
        } else {
            format!(
                "the update stopped before the swap; {} was not changed",
                ctx.root.path.display()
            )
        };
        err.context(msg)
    }
}
