//! `imageupd plan` and `imageupd apply`: the update pipeline of SPEC §5,
//! one function per step, in order (`pipeline`): resolve, plan,
//! preflight, fetch, stage, sync, quiesce (pre-apply hooks), swap and
//! commit (`etc/image_id`, journal), resume (post-apply hooks), and in
//! [`run`] the kernel step ([`crate::boot::reboot::after_apply`]). Every
//! failure before the swap leaves the root as it was; a failure or crash
//! during the swap leaves each path wholly old or wholly new, and the next
//! run converges. This layer uses [`crate::boot`], [`crate::engine`] and
//! the layers below them.

use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};

use crate::engine::config::{Config, KernelPolicy};
use crate::engine::journal::Journal;
use crate::engine::lifecycle::Event;
use crate::engine::lock::Lock;
use crate::fs::rootfs::RootFs;
use crate::sys::error::ExitKind;
use crate::sys::progress::Progress;

pub use crate::engine::report::{human_summary, ApplyReport, KernelVerdict, WalkReport};

mod context;
pub mod gate;
pub mod metrics;
mod preflight;
mod resolve;
mod staging;
mod survey;
mod swap;
pub mod trust;

use context::{refresh_stamps, Clock, Ctx};
use staging::Begun;

/// What the operator asked for.
#[derive(Clone, Debug, Default)]
pub struct ApplyOptions {
    /// The root to update.
    pub root: PathBuf,
    /// `--from`: store directory or image directory.
    pub from: Option<String>,
    /// `--id`: target image.
    pub id: Option<String>,
    /// `--allow-unsigned`.
    pub allow_unsigned: bool,
    /// `--allow-downgrade` (and `imageupd rollback`): the operator's local
    /// intent to install a lower release than the node's high-water mark.
    pub allow_downgrade: bool,
    /// `--kernel-policy`.
    pub kernel_policy: Option<KernelPolicy>,
    /// Plan only (`imageupd plan`).
    pub dry_run: bool,
    /// `--ca-file`: extra CA certificate(s) for an `https://` source (host path).
    pub ca_file: Option<PathBuf>,
    /// Set (by the agent on SIGTERM) to stop at the next safe point before
    /// the swap; once the swap has begun, the update finishes.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Asked just before the pre-apply hooks whether the node may be
    /// disrupted now (the fleet rollout's slot); waits until it may.
    pub slot: Option<std::sync::Arc<dyn gate::SlotGate>>,
    /// Keep what the swap replaces (hard links in `var/lib/imageupd/keep`,
    /// [`crate::engine::keep`]) for a rollback in place, until the health
    /// gate passes: set by the callers that run the gate.
    pub keep_replaced: bool,
    /// The agent's change tracker: when it vouches for the interval since
    /// its last walk, only the directories that changed are listed again.
    pub tracker: Option<std::sync::Arc<crate::fs::track::Tracker>>,
}

impl ApplyOptions {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Plan (and unless `dry_run`, apply) an update.
pub fn run(opts: &ApplyOptions, progress: &Progress) -> Result<ApplyReport> {
    let root = RootFs::open(&opts.root).context(ExitKind::Usage)?;
    let cfg = Config::load(&root.path)?;
    let _lock = if opts.dry_run {
        None
    } else {
        Some(Lock::acquire(&root.runtime_dir())?)
    };
    let mut ctx = Ctx::new(opts, cfg, root, progress)?;
    let mut res = pipeline(&mut ctx);
    if !opts.dry_run {
        ctx.record_outcome(&res);
    }
    // SPEC §5 step 8, once the status says reboot-pending.
    if let (false, Ok(r)) = (opts.dry_run, &mut res) {
        kernel(&ctx, r);
    }
    res
}

/// The pipeline, step by step; each step's time is a phase of the report.
fn pipeline(ctx: &mut Ctx<'_>) -> Result<ApplyReport> {
    let mut clock = Clock::new();
    let mut report = ApplyReport {
        root: ctx.root.path.display().to_string(),
        ..Default::default()
    };
    let t = resolve::resolve(ctx, &mut report)?;
    clock.lap("resolve");
    let s = survey::survey(ctx, &t, &mut report)?;
    clock.lap("plan");
    let res = update(ctx, &t, &s, clock, report);
    // Whatever the outcome, the walk is the change tracker's next baseline
    // (every change since it began is an event of the next interval).
    survey::hand_back(ctx, s);
    res
}

/// The steps after the plan: preflight, then the update itself.
fn update(
    ctx: &mut Ctx<'_>,
    t: &resolve::Target,
    s: &survey::Survey,
    mut clock: Clock,
    mut report: ApplyReport,
) -> Result<ApplyReport> {
    let nothing = preflight::preflight(ctx, t, s, &mut report)?;
    if ctx.opts.dry_run {
        return Ok(clock.finish(report, "planned"));
    }
    if nothing {
        nothing_to_do(ctx, t, s);
        return Ok(clock.finish(report, "nothing-to-do"));
    }
    if ctx.opts.cancelled() {
        bail!(
            "stopped on request before the update to {} started; {} was not changed",
            t.id,
            ctx.root.path.display()
        );
    }
    preflight::announce(ctx, t, s, &report);
    let mut b = Begun::begin(ctx, t, &report)?;
    b.fetch(ctx, t, s, &mut report)?;
    clock.lap("fetch");
    ctx.advance(Event::Fetched);
    let staged = b.stage(ctx, t, s, &mut report)?;
    clock.lap("stage");
    b.keep(ctx, t, s);
    clock.lap("keep");
    b.sync(ctx, t, s, &mut report)?;
    clock.lap("sync");
    b.stop_if_cancelled(ctx)?;
    let q = swap::quiesce(ctx, &mut b, t, s, &mut report)?;
    clock.lap("pre-apply-hooks");
    swap::swap_and_commit(ctx, &mut b, t, s, &staged, &mut report)?;
    clock.lap("swap");
    let ro_pending = swap::read_only_again(&mut b, report.swap.cleanup_deferred);
    swap::resume(ctx, &mut b, q, ro_pending, clock, report)
}

/// The root already matches the target: keep the walk's stamps and say so.
fn nothing_to_do(ctx: &Ctx<'_>, t: &resolve::Target, s: &survey::Survey) {
    if let Some(st) = &t.state {
        refresh_stamps(st.as_fd(), s.stamps.as_ref(), s.new_stamps.as_deref());
        // A root already on a higher release (provisioned) raises the mark.
        if let Err(e) = crate::engine::releases::record_installed(st.as_fd(), t.manifest()) {
            tracing::warn!("could not record the release high-water mark: {e:#}");
        }
    }
    ctx.progress.line(&format!(
        "nothing to do: {} already matches image {}",
        ctx.root.path.display(),
        t.id
    ));
}

/// The kernel step: act on a kernel change by policy (kexec, reboot or
/// defer), or settle an older pending one.
fn kernel(ctx: &Ctx<'_>, r: &mut ApplyReport) {
    let policy = ctx.opts.kernel_policy.unwrap_or(ctx.cfg.kernel_policy);
    crate::boot::reboot::after_apply(
        &crate::boot::reboot::Actuator::host(),
        &ctx.root,
        &ctx.cfg,
        policy,
        r,
        ctx.progress,
    );
}

/// `imageupd rollback`: apply the previous image again, from the source the
/// last update came from. Its record (kept since that update) names it.
pub fn rollback(
    root: &std::path::Path,
    from: Option<String>,
    progress: &Progress,
) -> Result<ApplyReport> {
    let rf = RootFs::open(root).context(ExitKind::Usage)?;
    let state = rf
        .state_dir()?
        .ok_or_else(|| {
            anyhow!(
                "{} has no imageupd state: nothing to roll back to",
                rf.path.display()
            )
        })
        .context(ExitKind::Usage)?;
    let prev = crate::engine::record::previous_id(state.as_fd())?
        .ok_or_else(|| {
            anyhow!(
                "{} has no previous image recorded: nothing to roll back to",
                rf.path.display()
            )
        })
        .context(ExitKind::Usage)?;
    let from = match from {
        Some(f) => f,
        None => Journal::load(state.as_fd())?
            .map(|j| j.source)
            .ok_or_else(|| anyhow!("no record of where the last update came from; pass --from"))
            .context(ExitKind::Usage)?,
    };
    progress.line(&format!("rolling back to {prev} from {from}"));
    let opts = ApplyOptions {
        root: rf.path.clone(),
        from: Some(from),
        id: Some(prev),
        // Going back is the point: local intent (also the fleet's
        // automatic rollback in place, a decision the node took itself).
        allow_downgrade: true,
        ..Default::default()
    };
    drop(state);
    run(&opts, progress)
}

/// The health gate's rollback in place: back to the previous image from
/// the node itself — its record of that image's manifest and the inodes
/// the last swap replaced, kept since ([`crate::engine::keep`]) — so no
/// network is needed; objects the keep area lacks come from the source the
/// last update came from. The keep area is dropped once the root is back.
pub fn rollback_in_place(root: &std::path::Path, progress: &Progress) -> Result<ApplyReport> {
    let rf = RootFs::open(root).context(ExitKind::Usage)?;
    let last = rf
        .state_dir()?
        .map(|s| Journal::load(s.as_fd()))
        .transpose()?
        .flatten()
        .map(|j| j.source)
        .ok_or_else(|| anyhow!("no record of where the last update came from"))
        .context(ExitKind::Usage)?;
    let inner = crate::net::keep_source::strip_keep(&last).unwrap_or(&last);
    let from = format!("{}{inner}", crate::net::keep_source::KEEP_PREFIX);
    let rep = rollback(root, Some(from), progress)?;
    drop_kept(root);
    Ok(rep)
}

/// Drop the keep area of `root` (the gate passed, or the rollback is
/// done); a failure is logged, never fatal: it is only a cache.
pub fn drop_kept(root: &std::path::Path) {
    match RootFs::open(root).and_then(|r| r.state_dir()) {
        Ok(Some(s)) => crate::engine::keep::drop_area(s.as_fd()),
        Ok(None) => {}
        Err(e) => tracing::warn!("cannot drop the keep area: {e:#}"),
    }
}

#[cfg(test)]
pub(crate) mod kernel_tests;
