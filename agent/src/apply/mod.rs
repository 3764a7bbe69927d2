//! `imageupd plan` and `imageupd apply`: the update pipeline of SPEC §5.
//!
//! resolve → plan → preflight → stage → durability sync → quiesce (pre-apply
//! hooks) → swap → removals → commit (`etc/image_id`, journal) → resume
//! (post-apply hooks). Every failure before the swap leaves the root as it
//! was; a failure or crash during the swap leaves each path wholly old or
//! wholly new, and the next run converges.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::engine::config::{Config, KernelPolicy};
use crate::engine::hooks::{HookEnv, HookPhase, HookRunner};
use crate::engine::journal::{Journal, JournalPhase};
use crate::engine::lifecycle::{Event, Lifecycle, Phase};
use crate::engine::lock::Lock;
use crate::engine::plan::{self, Plan, RootView};
use crate::engine::record::{
    promote_next_record, write_image_id, write_next_record, CurrentRecord,
};
use crate::engine::remount;
use crate::engine::stage;
use crate::engine::status::Status;
use crate::engine::swap::{self, SwapReport};
use crate::format::kernel;
use crate::format::manifest::{Manifest, RelPath};
use crate::format::sign;
use crate::format::trust::Trust;
use crate::fs::fsx;
use crate::fs::preserve::Preserve;
use crate::fs::rootfs::{self, RootFs};
use crate::fs::scan::{self, ScanOptions};
use crate::fs::store;
use crate::net::source::Source;
use crate::sys::error::ExitKind;
use crate::sys::fault;
use crate::sys::progress::{human_bytes, Progress};

pub use crate::engine::report::{human_summary, ApplyReport, KernelVerdict, WalkReport};

/// Space per staged object beyond its content, for block rounding and inodes, in bytes.
const PER_OBJECT_OVERHEAD: u64 = 4096;

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
    /// `--kernel-policy`.
    pub kernel_policy: Option<KernelPolicy>,
    /// Plan only (`imageupd plan`).
    pub dry_run: bool,
    /// `--ca-file`: extra CA certificate(s) for an `https://` source (host path).
    pub ca_file: Option<PathBuf>,
    /// Set (by the agent on SIGTERM) to stop at the next safe point before
    /// the swap; once the swap has begun, the update finishes.
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl ApplyOptions {
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Store the walk's stamps for the next run unless they are what was
/// loaded. Best effort: the cache only saves time (a read-only root, say,
/// keeps the old one, which stays correct).
fn refresh_stamps(
    state: std::os::fd::BorrowedFd<'_>,
    old: Option<&crate::fs::stamps::Stamps>,
    new: &crate::fs::stamps::Stamps,
) {
    if old == Some(new) {
        return;
    }
    if let Err(e) = crate::fs::stamps::save(state, new) {
        tracing::debug!("could not store the stamp cache: {e}");
    }
}

/// Phase stopwatch.
struct Clock {
    start: Instant,
    mark: Instant,
    phases: BTreeMap<String, u64>,
}

impl Clock {
    fn new() -> Self {
        let now = Instant::now();
        Clock {
            start: now,
            mark: now,
            phases: BTreeMap::new(),
        }
    }
    fn lap(&mut self, name: &str) {
        let now = Instant::now();
        *self.phases.entry(name.to_string()).or_default() += (now - self.mark).as_millis() as u64;
        self.mark = now;
    }
}

/// Remounts the root read-only again when dropped, if we made it writable.
struct RwGuard {
    mount_point: Option<PathBuf>,
}

impl RwGuard {
    fn restore(&mut self) -> Result<()> {
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

/// File name of the plan handed to hooks (`IMAGEUPD_PLAN`), in the runtime
/// directory.
const PLAN_JSON: &str = "plan.json";

/// Intermediate phases reach the live status file at most this often, in
/// ms: every write is a file creation and rename on the runtime directory,
/// and a quick update should not pay for half a dozen of them.
const STATUS_EVERY_MS: u128 = 1000;

struct Ctx<'a> {
    opts: &'a ApplyOptions,
    cfg: Config,
    root: RootFs,
    progress: &'a Progress,
    lifecycle: Lifecycle,
    status: Status,
    /// When the live status was last written.
    status_saved: Option<Instant>,
}

impl Ctx<'_> {
    /// Take a lifecycle step. The live status file is written when the
    /// update starts, when services are about to be quiesced (what an
    /// operator looking at a node most needs to see), and otherwise at
    /// most every [`STATUS_EVERY_MS`]; the final state is always written by
    /// [`run`].
    fn advance(&mut self, ev: Event) {
        match self.lifecycle.advance(ev) {
            Ok(p) => {
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
        updated: crate::sys::clock::now_rfc3339(),
        pid: std::process::id(),
    };
    let mut ctx = Ctx {
        opts,
        cfg,
        root,
        progress,
        lifecycle: Lifecycle::new(),
        status,
        status_saved: None,
    };
    let mut res = run_inner(&mut ctx);
    if !opts.dry_run {
        let rt = ctx.root.runtime_dir();
        match &res {
            Ok(r) => {
                ctx.status.result = r.result.clone();
                ctx.status.phases_ms = r.phases.clone();
                ctx.status.quiesce_ms = r.quiesce_ms;
                ctx.status.current = ctx.root.image_id().ok().flatten();
                ctx.status.reboot_required = r.kernel.changed;
                ctx.status.reboot_reason = r.kernel.reason.clone();
                if ctx.lifecycle.phase() == Phase::Resumed {
                    let ev = if r.kernel.changed {
                        Event::KernelChanged
                    } else {
                        Event::Reset
                    };
                    ctx.advance(ev);
                } else if ctx.lifecycle.phase() == Phase::Planned {
                    ctx.advance(Event::NothingToDo);
                }
            }
            Err(e) => {
                ctx.status.result = if ExitKind::of(e) == ExitKind::PostApplyHook {
                    "failed-committed"
                } else {
                    "failed"
                }
                .into();
                ctx.status.last_error = Some(format!("{e:#}"));
                ctx.status.current = ctx.root.image_id().ok().flatten();
                if ctx.lifecycle.phase() != Phase::Idle {
                    ctx.advance(Event::Failed);
                }
            }
        }
        ctx.status.updated = crate::sys::clock::now_rfc3339();
        if let Err(e) = ctx.status.save(&rt) {
            tracing::warn!("could not write status: {e:#}");
        }
    }
    // SPEC §5 step 8, once the status says reboot-pending.
    if let (false, Ok(r)) = (opts.dry_run, &mut res) {
        let policy = opts.kernel_policy.unwrap_or(ctx.cfg.kernel_policy);
        crate::boot::reboot::after_apply(
            &crate::boot::reboot::Actuator::host(),
            &ctx.root,
            &ctx.cfg,
            policy,
            r,
            progress,
        );
    }
    res
}

fn run_inner(ctx: &mut Ctx<'_>) -> Result<ApplyReport> {
    let mut clock = Clock::new();
    let mut report = ApplyReport {
        root: ctx.root.path.display().to_string(),
        ..Default::default()
    };
    let state = ctx.root.state_dir()?;
    let journal = match &state {
        Some(s) => Journal::load(s.as_fd())?,
        None => None,
    };
    let interrupted = journal.as_ref().filter(|j| j.interrupted()).cloned();
    // Resolve the target: arguments first, else an interrupted update.
    let id = ctx
        .opts
        .id
        .clone()
        .or_else(|| interrupted.as_ref().map(|j| j.target.clone()))
        .ok_or_else(|| anyhow!("no target image: pass --id ID (or --from-metadata)"))
        .context(ExitKind::Usage)?;
    let from = ctx
        .opts
        .from
        .clone()
        .or_else(|| {
            interrupted
                .as_ref()
                .filter(|j| j.target == id)
                .map(|j| j.source.clone())
        })
        .ok_or_else(|| anyhow!("no source: pass --from STORE_OR_IMAGE_DIR"))
        .context(ExitKind::Usage)?;
    if let Some(j) = &interrupted {
        report.resumed = true;
        ctx.progress.line(&format!(
            "an update to {} was interrupted during {:?}; converging",
            j.target, j.phase
        ));
    }
    ctx.status.target = Some(id.clone());
    ctx.status.source = Some(from.clone());
    report.id = id.clone();
    report.from_id = ctx.root.image_id()?;
    ctx.advance(Event::Planned);
    let net = crate::net::fetch::NetOptions::for_root(
        ctx.opts.ca_file.as_deref(),
        ctx.cfg.ca_file.as_deref(),
        &ctx.root.path,
    );
    let source = Source::open_with(&from, &net)?;
    report.source = source.describe();
    let keys_dir = ctx.root.path.join("etc/imageupd/trusted.d");
    let keys = sign::load_trusted(&keys_dir)?;
    let trust = Trust {
        keys: &keys,
        keys_dir: keys_dir.display().to_string(),
        allow_unsigned: ctx.opts.allow_unsigned || ctx.cfg.allow_unsigned,
    };
    let threads = ctx.cfg.threads();
    let resolved = source.manifest(&id, &trust, threads)?;
    report.signed_by = resolved.signed_by.clone();
    report.download = source.download_report();
    let target = &resolved.manifest;
    clock.lap("resolve");

    let cur = CurrentRecord::load(&state, &resolved.stored);
    let running = rootfs::running_release();
    let mut preserve = Preserve::new(&ctx.cfg.preserve).map_err(anyhow::Error::msg)?;
    if let Some(r) = &running {
        for p in [
            format!("/lib/modules/{r}/"),
            format!("/usr/lib/modules/{r}/"),
        ] {
            preserve.add(&p).map_err(anyhow::Error::msg)?;
        }
    }
    let skip = vec![RelPath(stage::STAGE_AT_TOP.as_bytes().to_vec())];
    let stamps = state
        .as_ref()
        .and_then(|s| crate::fs::stamps::load(s.as_fd()));
    let walk_start = crate::fs::stamps::now_ns();
    let nodes = scan::scan(
        ctx.root.fd(),
        &ScanOptions {
            preserve: Some(&preserve),
            skip,
            stamps: stamps.as_ref(),
        },
    )?;
    report.walk = WalkReport {
        objects: nodes.len() as u64,
        from_stamps: nodes.iter().filter(|n| n.cached).count() as u64,
    };
    // The node's record of its current image says what each unchanged root
    // file holds (even where two images share size and mtime but not
    // content). When the stamp cache vouches for the unchanged inodes, the
    // record is parsed only if the plan needs it to settle a conflict.
    let mut parsed_current: Option<Manifest> = None;
    // A mostly cold cache (a root changed moments ago) would leave many
    // same-size files to hash: the record is cheaper then.
    let stamps_cover = report.walk.from_stamps * 10 >= report.walk.objects * 9;
    if !cur.same_as_target && !stamps_cover {
        parsed_current = cur.parse();
    }
    let root_fd = ctx.root.fd();
    let plan_with = |current: Option<&Manifest>| -> Result<Plan> {
        // Without the record (first apply, or not parsed), size and mtime
        // alone do not prove content: same-size files the stamp cache does
        // not vouch for are hashed.
        let to_hash = plan::needs_hash(target, &nodes, current, current.is_none());
        let hashed = crate::sys::par::par_map(&to_hash, threads, |p| {
            let f = fsx::open_file_beneath(root_fd, p).with_context(|| format!("opening {p}"))?;
            Ok((
                p.clone(),
                crate::format::stream::digest_of(std::io::BufReader::with_capacity(256 * 1024, f))?
                    .0,
            ))
        })?;
        let digests: crate::sys::fastmap::HashMap<RelPath, _> = hashed.into_iter().collect();
        let view = RootView {
            nodes: &nodes,
            digests: &digests,
        };
        Ok(plan::plan(target, &view, current, &preserve))
    };
    let mut p = if cur.same_as_target {
        plan_with(Some(target))?
    } else {
        plan_with(parsed_current.as_ref())?
    };
    if !p.conflicts.is_empty() && parsed_current.is_none() && cur.stored.is_some() {
        // A conflict the record may settle (a symlink the current image
        // installed): plan again with it.
        parsed_current = cur.parse();
        if parsed_current.is_some() {
            p = plan_with(parsed_current.as_ref())?;
        }
    }
    let current: Option<&Manifest> = if cur.same_as_target {
        Some(target)
    } else {
        parsed_current.as_ref()
    };
    let new_stamps =
        crate::fs::stamps::Stamps::from_nodes(ctx.root.dev, &nodes, &p.root_digests, walk_start);
    report.plan = p.stats.clone();
    report.warnings = p.warnings.clone();
    for w in &p.warnings {
        tracing::warn!("{w}");
    }
    // Kernel: compare with the running kernel only on the real root.
    let host = ctx.root.is_host_root();
    let reason = kernel::change_reason(
        target.kernel.as_ref(),
        current
            .and_then(|c| c.kernel.as_ref())
            .or(cur.kernel.as_ref()),
        if host { running.as_deref() } else { None },
    );
    report.kernel = KernelVerdict {
        changed: reason.is_some(),
        reason,
        target_release: target.kernel.as_ref().map(|k| k.release.clone()),
        policy: Some(ctx.opts.kernel_policy.unwrap_or(ctx.cfg.kernel_policy)),
        target_kernel: target.kernel.clone(),
        action: None,
    };
    clock.lap("plan");

    // Preflight.
    if !p.conflicts.is_empty() {
        return Err(anyhow!("{}", p.conflicts.join("\n")))
            .context(format!(
                "refusing to apply {id}: the root has {} conflict(s); nothing was changed",
                p.conflicts.len()
            ))
            .context(ExitKind::Preflight);
    }
    let (free, free_inodes) = fsx::free_space(ctx.root.fd()).context("statvfs of the root")?;
    let need = p.stats.stage_bytes
        + p.stats.stage_objects * PER_OBJECT_OVERHEAD
        + (ctx.cfg.space_margin_mib << 20);
    let need = need + source.cache_space(&p.fetch);
    report.space_needed = need;
    report.space_free = free;
    let skip_space = std::env::var_os("IMAGEUPD_SKIP_SPACE_CHECK").is_some_and(|v| v == "1");
    let nothing =
        p.is_noop() && report.from_id.as_deref() == Some(id.as_str()) && interrupted.is_none();
    if !nothing && !skip_space && (need > free || p.stats.stage_objects + 64 > free_inodes) {
        return Err(anyhow!(
            "not enough free space on the root's filesystem: staging needs {} ({} objects + {} MiB margin) but {} ({} inodes) are free; nothing was changed",
            human_bytes(need),
            p.stats.stage_objects,
            ctx.cfg.space_margin_mib,
            human_bytes(free),
            free_inodes
        ))
        .context(ExitKind::Preflight);
    }
    if ctx.opts.dry_run {
        report.result = "planned".into();
        report.phases = clock.phases;
        report.total_ms = clock.start.elapsed().as_millis() as u64;
        return Ok(report);
    }
    if nothing {
        if let Some(s) = &state {
            refresh_stamps(s.as_fd(), stamps.as_ref(), &new_stamps);
        }
        ctx.progress.line(&format!(
            "nothing to do: {} already matches image {id}",
            ctx.root.path.display()
        ));
        report.result = "nothing-to-do".into();
        report.phases = clock.phases;
        report.total_ms = clock.start.elapsed().as_millis() as u64;
        return Ok(report);
    }
    if ctx.opts.cancelled() {
        bail!(
            "stopped on request before the update to {id} started; {} was not changed",
            ctx.root.path.display()
        );
    }
    ctx.progress.line(&format!(
        "applying {id} over {} at {}: +{} ~{} -{} ={} (fetch {} in {} objects, {} local copies)",
        report.from_id.as_deref().unwrap_or("(unknown)"),
        ctx.root.path.display(),
        p.stats.added,
        p.stats.changed,
        p.stats.deleted,
        p.stats.metadata_only,
        human_bytes(p.stats.fetch_bytes),
        p.stats.fetch_objects,
        p.stats.local_copies
    ));

    // Make the root writable (remembering to undo it), even when resuming a
    // run that died while it was writable.
    let mut rw = RwGuard { mount_point: None };
    let mount = remount::find(&ctx.root.path)?;
    let was_remounted = interrupted.as_ref().is_some_and(|j| j.remounted_rw);
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
        target: id.clone(),
        from: report.from_id.clone(),
        source: source.location(),
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
    // No fsync: until the swap nothing needs it to survive a power loss
    // (staging leftovers are removed on every start, and a remount does not
    // outlive a reboot); the syncfs before the swap makes it durable.
    journal.store_unsynced(state.as_fd(), JournalPhase::Staging)?;
    fault::point("after-journal-begin");

    // Fetch (remote sources) and stage while services run.
    if let Err(e) = source.prefetch(&p.fetch, state.as_fd(), ctx.progress) {
        let resuming = interrupted.is_some();
        return Err(abort_before_swap(
            ctx,
            &mut journal,
            &state,
            &mut rw,
            None,
            e,
            resuming,
        ));
    }
    report.download = source.download_report();
    clock.lap("fetch");
    ctx.advance(Event::Fetched);
    let staging = stage::prepare(ctx.root.fd(), ctx.root.dev, state.as_fd())?;
    let resuming = interrupted.is_some();
    // Every stop between here and the swap: close the staging directory
    // (an open, deleted inode keeps a read-only remount busy), remove it,
    // close the journal and restore a read-only root.
    macro_rules! abort {
        ($err:expr) => {
            return Err(abort_before_swap(
                ctx,
                &mut journal,
                &state,
                &mut rw,
                Some(staging),
                $err,
                resuming,
            ))
        };
    }
    let staged = stage::stage(
        &p,
        target,
        ctx.root.fd(),
        &staging,
        &source,
        ctx.progress,
        threads,
    );
    let (names, stage_report) = match staged {
        Ok(v) => v,
        Err(e) => abort!(e),
    };
    report.stage = stage_report;
    // New directory trees are put together in staging while services run.
    let trees = match swap::assemble(&p, target, ctx.root.fd(), &staging, &names) {
        Ok(t) => t,
        Err(e) => abort!(e),
    };
    // The record of the new image is written now and only renamed at commit.
    if let Err(e) = write_next_record(&state, &resolved) {
        abort!(e);
    }
    fault::point("after-stage");
    clock.lap("stage");
    // Staged: the download cache is spent (outside the quiesce window).
    if let Err(e) = source.drop_cache(state.as_fd()) {
        report.warnings.push(format!("{e:#}"));
    }
    ctx.advance(Event::Staged);
    // What this run's walk read stays true for every inode the swap leaves
    // alone (the others get new ctimes and miss next time).
    refresh_stamps(state.as_fd(), stamps.as_ref(), &new_stamps);
    // The journal says "swapping" before the first rename: made durable by
    // this syncfs together with the staged content. A stop before the swap
    // turns it into "aborted" (abort_before_swap).
    journal.store_unsynced(state.as_fd(), JournalPhase::Swapping)?;
    fsx::syncfs(ctx.root.fd()).context("syncfs before the swap")?;
    fault::point("after-presync");
    clock.lap("sync");
    if ctx.opts.cancelled() {
        let err = anyhow!("stopped on request after staging, before the swap");
        abort!(err);
    }

    // Quiesce.
    let runner = HookRunner::for_root(
        &ctx.root.path,
        Duration::from_secs(ctx.cfg.hook_timeout_secs),
    );
    // The plan's JSON is for hooks; with none installed it is not written
    // (and a stale one from an earlier run is removed).
    let plan_path = if runner.any(&[HookPhase::PreApply, HookPhase::PostApply, HookPhase::Abort]) {
        write_plan_json(ctx, &report, &p, target)?
    } else {
        let path = ctx.root.runtime_dir().join(PLAN_JSON);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => report.warnings.push(format!(
                "could not remove the stale {}: {e}",
                path.display()
            )),
        }
        path
    };
    let hook_env = HookEnv {
        root: ctx.root.path.clone(),
        from: report.from_id.clone(),
        to: id.clone(),
        plan_path,
        kernel_changed: report.kernel.changed,
    };
    ctx.advance(Event::Quiesced);
    let quiesce_start = Instant::now();
    if let Err(e) = runner.run(HookPhase::PreApply, &hook_env) {
        ctx.progress
            .line("a pre-apply hook failed; running abort hooks");
        let abort = runner.run(HookPhase::Abort, &hook_env);
        let mut err = anyhow::Error::new(e);
        if let Err(a) = abort {
            err = err.context(format!("and an abort hook failed too: {a}"));
        }
        let err = err.context(ExitKind::PreApplyHook);
        abort!(err);
    }
    clock.lap("pre-apply-hooks");

    // Swap. Everything from here to the commit record is inside the
    // quiesce window, so it does no fsync of its own: one syncfs after the
    // renames, one after the commit record.
    ctx.advance(Event::Swapped);
    let mut sw = SwapReport {
        in_new_trees: trees.files + trees.dirs,
        ..Default::default()
    };
    let swap_res = (|| -> Result<()> {
        swap::swap(
            &p,
            target,
            &nodes,
            ctx.root.fd(),
            &swap::Staged {
                staging: &staging,
                names: &names,
                trees: &trees,
            },
            &mut sw,
        )?;
        fault::point("after-swap");
        swap::delete(&p, ctx.root.fd(), &mut sw)?;
        fault::point("after-delete");
        drop(staging);
        stage::cleanup(ctx.root.fd(), ctx.root.dev)?;
        promote_next_record(&state, cur.id.as_deref().is_some_and(|c| c != id))?;
        let mut dirs = p.dirmeta.clone();
        dirs.extend(forced_dirs(target));
        swap::finalise_dirs(&dirs, &target.entries, ctx.root.fd(), &mut sw)?;
        fsx::syncfs(ctx.root.fd()).context("syncfs after the swap")?;
        write_image_id(&ctx.root, &id)?;
        fault::point("after-image-id");
        swap::finalise_dirs(
            &forced_dirs(target),
            &target.entries,
            ctx.root.fd(),
            &mut sw,
        )?;
        fault::point("after-dirmeta");
        fault::point("before-commit");
        journal.store_unsynced(state.as_fd(), JournalPhase::Committed)?;
        fsx::syncfs(ctx.root.fd()).context("syncfs of the commit record")?;
        fault::point("after-commit");
        Ok(())
    })();
    report.swap = sw;
    if let Err(e) = swap_res {
        return Err(e.context(format!(
            "the swap to {id} stopped part-way: every path is wholly old or wholly new; run `imageupd apply --root {}` again to converge",
            ctx.root.path.display()
        )));
    }
    clock.lap("swap");
    // Read-only again before services come back; busy (deleted files still
    // open) is retried after the post-apply hooks restarted them.
    let mut ro_pending = false;
    if let Err(e) = rw.restore() {
        tracing::warn!("{e:#}; will retry after the post-apply hooks");
        rw.mount_point = mount.as_ref().map(|m| m.mount_point.clone());
        ro_pending = true;
    }

    // Resume.
    ctx.advance(Event::Resumed);
    report.quiesce_ms = Some(quiesce_start.elapsed().as_millis() as u64);
    let post = runner.run(HookPhase::PostApply, &hook_env);
    clock.lap("post-apply-hooks");
    if ro_pending {
        if let Err(e) = rw.restore() {
            report
                .warnings
                .push(format!("the root stays read-write: {e:#}"));
        }
    }
    report.phases = clock.phases;
    report.total_ms = clock.start.elapsed().as_millis() as u64;
    report.result = "applied".into();
    if let Err(e) = post {
        return Err(anyhow::Error::new(e))
            .context(format!(
                "the update to {id} is committed, but a post-apply hook failed"
            ))
            .context(ExitKind::PostApplyHook);
    }
    Ok(report)
}

/// Undo everything of a run that stopped before the swap: close and remove staging,
/// mark the journal, restore read-only. The root is as it was.
fn abort_before_swap(
    ctx: &mut Ctx<'_>,
    journal: &mut Journal,
    state: &OwnedFd,
    rw: &mut RwGuard,
    staging: Option<stage::Staging>,
    err: anyhow::Error,
    was_interrupted: bool,
) -> anyhow::Error {
    drop(staging);
    let mut err = err;
    if let Err(e) = stage::cleanup(ctx.root.fd(), ctx.root.dev) {
        err = err.context(format!("(staging leftovers could not be removed: {e:#})"));
    }
    // A run resuming an interrupted swap must keep the journal open.
    let phase = if was_interrupted {
        JournalPhase::Swapping
    } else {
        JournalPhase::Aborted
    };
    if let Err(e) = journal.store(state.as_fd(), phase) {
        err = err.context(format!("(journal not updated: {e:#})"));
    }
    if let Err(e) = rw.restore() {
        err = err.context(format!(
            "(the root could not be made read-only again: {e:#})"
        ));
    }
    let msg = if was_interrupted {
        "the update stopped before the swap; the root is as the interrupted run left it".to_string()
    } else {
        format!(
            "the update stopped before the swap; {} was not changed",
            ctx.root.path.display()
        )
    };
    err.context(msg)
}

/// Directories whose mtime our own bookkeeping touches.
fn forced_dirs(target: &Manifest) -> Vec<usize> {
    let want: [&[u8]; 4] = [b"etc", b"var/lib", b"var", b"."];
    target
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            want.contains(&e.path.as_bytes()) && e.ftype == crate::format::manifest::FileType::Dir
        })
        .map(|(i, _)| i)
        .collect()
}

fn write_plan_json(
    ctx: &Ctx<'_>,
    report: &ApplyReport,
    p: &Plan,
    target: &Manifest,
) -> Result<PathBuf> {
    let changed: Vec<String> = p
        .actions
        .iter()
        .map(|a| target.entries[plan::action_t(a)].path.to_string())
        .chain(p.deletes.iter().map(|d| d.path.to_string()))
        .collect();
    let doc = serde_json::json!({
        "id": report.id,
        "from": report.from_id,
        "root": report.root,
        "stats": report.plan,
        "kernel": report.kernel,
        "paths": changed,
    });
    let dir = ctx.root.runtime_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(PLAN_JSON);
    store::write_volatile(&path, &serde_json::to_vec_pretty(&doc)?)?;
    Ok(path)
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
        ..Default::default()
    };
    drop(state);
    run(&opts, progress)
}

#[cfg(test)]
mod kernel_tests;
