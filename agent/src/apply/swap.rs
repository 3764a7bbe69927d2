//! Steps "quiesce", "swap", "commit" and "resume": inside the quiesce
//! window, from the pre-apply hooks to the post-apply hooks.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

use super::context::{Clock, Ctx};
use super::resolve::Target;
use super::staging::{Assembled, Begun};
use super::survey::Survey;
use super::ApplyReport;
use crate::engine::hooks::{HookEnv, HookPhase, HookRunner};
use crate::engine::journal::JournalPhase;
use crate::engine::lifecycle::Event;
use crate::engine::plan::{self, Plan};
use crate::engine::record::{promote_next_record, write_image_id};
use crate::engine::stage;
use crate::engine::swap::{self, SwapReport};
use crate::format::manifest::Manifest;
use crate::fs::fsx;
use crate::fs::store;
use crate::sys::error::ExitKind;
use crate::sys::fault;
use std::os::fd::AsFd;

/// File name of the plan handed to hooks (`IMAGEUPD_PLAN`), in the runtime
/// directory.
const PLAN_JSON: &str = "plan.json";

/// Services quiesced by the pre-apply hooks.
pub(super) struct Quiesced {
    runner: HookRunner,
    hook_env: HookEnv,
    start: Instant,
}

/// Quiesce: write the plan for the hooks and run the pre-apply hooks (the
/// abort hooks when one fails).
pub(super) fn quiesce(
    ctx: &mut Ctx<'_>,
    b: &mut Begun,
    t: &Target,
    s: &Survey,
    report: &mut ApplyReport,
) -> Result<Quiesced> {
    let runner = HookRunner::for_root(
        &ctx.root.path,
        Duration::from_secs(ctx.cfg.hook_timeout_secs),
    );
    let plan_path = plan_for_hooks(ctx, &runner, report, &s.plan, t.manifest())?;
    let hook_env = HookEnv {
        root: ctx.root.path.clone(),
        from: report.from_id.clone(),
        to: t.id.clone(),
        plan_path,
        kernel_changed: report.kernel.changed,
    };
    if let Some(gate) = &ctx.opts.slot {
        if let Err(e) = gate.before_quiesce(&t.id) {
            return Err(b.abort(ctx, e));
        }
    }
    ctx.advance(Event::Quiesced);
    let start = Instant::now();
    if let Err(e) = runner.run(HookPhase::PreApply, &hook_env) {
        ctx.progress
            .line("a pre-apply hook failed; running abort hooks");
        let abort = runner.run(HookPhase::Abort, &hook_env);
        let mut err = anyhow::Error::new(e);
        if let Err(a) = abort {
            err = err.context(format!("and an abort hook failed too: {a}"));
        }
        let err = err.context(ExitKind::PreApplyHook);
        return Err(b.abort(ctx, err));
    }
    Ok(Quiesced {
        runner,
        hook_env,
        start,
    })
}

/// The plan's JSON is for hooks; with none installed it is not written
/// (and a stale one from an earlier run is removed).
fn plan_for_hooks(
    ctx: &Ctx<'_>,
    runner: &HookRunner,
    report: &mut ApplyReport,
    p: &Plan,
    target: &Manifest,
) -> Result<PathBuf> {
    if runner.any(&[HookPhase::PreApply, HookPhase::PostApply, HookPhase::Abort]) {
        return write_plan_json(ctx, report, p, target);
    }
    let path = ctx.root.runtime_dir().join(PLAN_JSON);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report.warnings.push(format!(
            "could not remove the stale {}: {e}",
            path.display()
        )),
    }
    Ok(path)
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

/// Swap and commit. Everything from here to the commit record is inside
/// the quiesce window, so the renames get no fsync of their own: one syncfs
/// after them, then `etc/image_id` and the journal's "committed" (small
/// files, each fsync'd before and after its rename), then one syncfs for
/// the directory metadata.
pub(super) fn swap_and_commit(
    ctx: &mut Ctx<'_>,
    b: &mut Begun,
    t: &Target,
    s: &Survey,
    a: &Assembled,
    report: &mut ApplyReport,
) -> Result<()> {
    ctx.advance(Event::Swapped);
    let mut sw = SwapReport {
        in_new_trees: a.trees.files + a.trees.dirs,
        ..Default::default()
    };
    let res = swap_paths(ctx, b, t, s, a, &mut sw).and_then(|()| commit(ctx, b, t, s, &mut sw));
    report.swap = sw;
    res.map_err(|e| {
        e.context(format!(
            "the swap to {} stopped part-way: every path is wholly old or wholly new; run `imageupd apply --root {}` again to converge",
            t.id,
            ctx.root.path.display()
        ))
    })
}

/// Move every staged object into place, remove what goes, and the staging
/// directory with it (it holds the replaced inodes) — unless removed trees
/// or files were moved into it: then it is left for [`remove_leftovers`]
/// after the window, which so pays renames, not the freeing of blocks.
fn swap_paths(
    ctx: &Ctx<'_>,
    b: &mut Begun,
    t: &Target,
    s: &Survey,
    a: &Assembled,
    sw: &mut SwapReport,
) -> Result<()> {
    let staging = b
        .staging
        .take()
        .ok_or_else(|| anyhow!("nothing was staged"))?;
    swap::swap(
        &s.plan,
        t.manifest(),
        &s.nodes,
        ctx.root.fd(),
        &swap::Staged {
            staging: &staging,
            names: &a.names,
            trees: &a.trees,
        },
        sw,
    )?;
    fault::point("after-swap");
    swap::delete(&s.plan, ctx.root.fd(), staging.fd.as_fd(), sw)?;
    fault::point("after-delete");
    drop(staging);
    sw.cleanup_deferred = sw.deleted_trees > 0 || sw.set_aside > 0;
    if !sw.cleanup_deferred {
        stage::cleanup(ctx.root.fd(), ctx.root.dev)?;
    }
    Ok(())
}

/// Remove what the swap left in staging (removed trees, replaced inodes)
/// once the post-apply hooks have run, before the root goes read-only
/// again; a run killed before it leaves leftovers that the next run's
/// start removes.
fn remove_leftovers(ctx: &Ctx<'_>, report: &mut ApplyReport) {
    if let Err(e) = stage::cleanup(ctx.root.fd(), ctx.root.dev) {
        report.warnings.push(format!(
            "could not remove what the swap replaced ({e:#}); the next run removes it"
        ));
    }
}

/// Commit: the new image's record, directory metadata, `etc/image_id` and
/// the journal's "committed", each made durable in order.
fn commit(ctx: &Ctx<'_>, b: &mut Begun, t: &Target, s: &Survey, sw: &mut SwapReport) -> Result<()> {
    let target = t.manifest();
    let id = &t.id;
    promote_next_record(&b.state, s.cur.id.as_deref().is_some_and(|c| c != id))?;
    crate::engine::releases::record_installed(b.state.as_fd(), target)?;
    let mut dirs = s.plan.dirmeta.clone();
    dirs.extend(forced_dirs(target));
    swap::finalise_dirs(&dirs, &target.entries, ctx.root.fd(), sw)?;
    fsx::syncfs(ctx.root.fd()).context("syncfs after the swap")?;
    write_image_id(&ctx.root, id)?;
    fault::point("after-image-id");
    swap::finalise_dirs(&forced_dirs(target), &target.entries, ctx.root.fd(), sw)?;
    fault::point("after-dirmeta");
    fault::point("before-commit");
    // Durable on its own (an empty journal after a power cut would stop
    // every later run); the syncfs below covers the directory metadata.
    b.journal.store(b.state.as_fd(), JournalPhase::Committed)?;
    fsx::syncfs(ctx.root.fd()).context("syncfs of the commit record")?;
    fault::point("after-commit");
    Ok(())
}

/// Read-only again before services come back; busy (deleted files still
/// open) is retried after the post-apply hooks restarted them: true then.
/// With the staging cleanup deferred past the hooks (`deferred`), the root
/// stays writable until that cleanup is done: true as well.
pub(super) fn read_only_again(b: &mut Begun, deferred: bool) -> bool {
    if deferred {
        return true;
    }
    if let Err(e) = b.rw.restore() {
        tracing::warn!("{e:#}; will retry after the post-apply hooks");
        b.rw.mount_point = b.mount.as_ref().map(|m| m.mount_point.clone());
        return true;
    }
    false
}

/// Resume: the post-apply hooks restart services; the report of the
/// committed update.
pub(super) fn resume(
    ctx: &mut Ctx<'_>,
    b: &mut Begun,
    q: Quiesced,
    ro_pending: bool,
    mut clock: Clock,
    mut report: ApplyReport,
) -> Result<ApplyReport> {
    ctx.advance(Event::Resumed);
    report.quiesce_ms = Some(q.start.elapsed().as_millis() as u64);
    let post = q.runner.run(HookPhase::PostApply, &q.hook_env);
    clock.lap("post-apply-hooks");
    if report.swap.cleanup_deferred {
        remove_leftovers(ctx, &mut report);
        clock.lap("cleanup");
    }
    if ro_pending {
        if let Err(e) = b.rw.restore() {
            report
                .warnings
                .push(format!("the root stays read-write: {e:#}"));
        }
    }
    let report = clock.finish(report, "applied");
    if let Err(e) = post {
        return Err(anyhow::Error::new(e))
            .context(format!(
                "the update to {} is committed, but a post-apply hook failed",
                report.id
            ))
            .context(ExitKind::PostApplyHook);
    }
    Ok(report)
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
