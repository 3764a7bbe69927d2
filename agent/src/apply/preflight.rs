//! Step "preflight": refuse a plan with conflicts or without the space to
//! stage it, before anything is changed.

use anyhow::{anyhow, Result};

use super::context::Ctx;
use super::resolve::Target;
use super::survey::Survey;
use super::ApplyReport;
use crate::fs::fsx;
use crate::sys::error::ExitKind;
use crate::sys::progress::human_bytes;
use anyhow::Context as _;

/// Space per staged object beyond its content, for block rounding and inodes, in bytes.
const PER_OBJECT_OVERHEAD: u64 = 4096;

/// Check the plan can be applied; true when there is nothing to do.
pub(super) fn preflight(
    ctx: &Ctx<'_>,
    t: &Target,
    s: &Survey,
    report: &mut ApplyReport,
) -> Result<bool> {
    let p = &s.plan;
    let id = &t.id;
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
    let need = need + t.source.cache_space(&p.fetch);
    report.space_needed = need;
    report.space_free = free;
    let skip_space = std::env::var_os("IMAGEUPD_SKIP_SPACE_CHECK").is_some_and(|v| v == "1");
    let nothing =
        p.is_noop() && report.from_id.as_deref() == Some(id.as_str()) && t.interrupted.is_none();
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
    Ok(nothing)
}

/// Say what is about to happen.
pub(super) fn announce(ctx: &Ctx<'_>, t: &Target, s: &Survey, report: &ApplyReport) {
    let p = &s.plan;
    ctx.progress.line(&format!(
        "applying {} over {} at {}: +{} ~{} -{} ={} (fetch {} in {} objects, {} local copies)",
        t.id,
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
}
