//! Step "plan": walk the root and plan what must change, with the kernel
//! verdict.

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};

use super::context::Ctx;
use super::resolve::Target;
use super::{ApplyReport, KernelVerdict, WalkReport};
use crate::engine::plan::{self, Plan, RootView};
use crate::engine::record::CurrentRecord;
use crate::engine::stage;
use crate::format::kernel;
use crate::format::manifest::{KernelInfo, Manifest, RelPath};
use crate::fs::fsx;
use crate::fs::node::Node;
use crate::fs::preserve::Preserve;
use crate::fs::rootfs;
use crate::fs::scan::{self, ScanOptions};
use crate::fs::stamps::{self, StampSum};
use crate::fs::track;

/// What the walk of the root found and what must change.
pub(super) struct Survey {
    /// The node's record of its current image.
    pub(super) cur: CurrentRecord,
    /// The root's objects, as walked.
    pub(super) nodes: Vec<Node>,
    /// What must change.
    pub(super) plan: Plan,
    /// The checksum of the stamp cache as loaded (the cache itself is
    /// dropped after the walk).
    pub(super) stamps: Option<StampSum>,
    /// The stamp cache this walk vouches for, encoded (none after a
    /// tracked walk).
    pub(super) new_stamps: Option<Vec<u8>>,
    /// When the walk began, ns since the epoch.
    pub(super) walk_start: i64,
    /// What shaped the walk besides the tree ([`walk_key`]).
    walk_key: String,
}

/// The walk of the root, before planning.
struct Walk {
    cur: CurrentRecord,
    running: Option<String>,
    preserve: Preserve,
    stamps: Option<StampSum>,
    walk_start: i64,
    key: String,
    nodes: Vec<Node>,
}

/// Walk the root, plan the update and judge the kernel.
pub(super) fn survey(ctx: &Ctx<'_>, t: &Target, report: &mut ApplyReport) -> Result<Survey> {
    let walk = walk_root(ctx, t, report)?;
    let (plan, current_kernel) = plan_changes(ctx, t, &walk, report)?;
    // A tracked walk leaves the stamp cache as the last full walk wrote it:
    // the tracker's baseline carries what it would, and entries for inodes
    // changed since are misses (ctime), never wrong.
    let new_stamps = (report.walk.mode != "tracked").then(|| {
        stamps::encode_nodes(
            ctx.root.dev,
            &walk.nodes,
            &plan.root_digests,
            walk.walk_start,
        )
    });
    report.plan = plan.stats.clone();
    report.warnings = plan.warnings.clone();
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    report.kernel = kernel_verdict(ctx, t.manifest(), current_kernel, walk.running.as_deref());
    Ok(Survey {
        cur: walk.cur,
        nodes: walk.nodes,
        plan,
        stamps: walk.stamps,
        new_stamps,
        walk_start: walk.walk_start,
        walk_key: walk.key,
    })
}

/// Walk the root (the running kernel's modules and the staging directory
/// left out), using the stamp cache.
fn walk_root(ctx: &Ctx<'_>, t: &Target, report: &mut ApplyReport) -> Result<Walk> {
    let cur = CurrentRecord::load(&t.state, &t.resolved.stored);
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
    let walk_start = stamps::now_ns();
    let key = walk_key(ctx, running.as_deref());
    let tracked = ctx.opts.tracker.as_ref().map(|tr| tr.begin(&key));
    // The stamp cache serves full walks; a tracked one has its baseline.
    let stamps = match &tracked {
        Some(Ok(_)) => None,
        _ => t.state.as_ref().and_then(|s| stamps::load(s.as_fd())),
    };
    let opts = ScanOptions {
        preserve: Some(&preserve),
        skip,
        stamps: stamps.as_ref(),
    };
    let (nodes, walk) = match tracked {
        Some(Ok((base, changes))) => {
            let (nodes, st) = track::walk::walk(ctx.root.fd(), &opts, base, &changes.dirs)?;
            tracing::info!(
                "tracked walk: {} changed directories ({} removed since), {} listed again, {} objects reused",
                changes.dirs.len(),
                changes.stale,
                st.relisted,
                st.reused
            );
            let w = WalkReport {
                mode: "tracked",
                from_tracking: st.reused,
                relisted_dirs: st.relisted,
                ..WalkReport::default()
            };
            (nodes, w)
        }
        other => {
            let fallback = match other {
                Some(Err(why)) => Some(why),
                _ => None,
            };
            if let Some(why) = &fallback {
                tracing::info!("change tracking cannot vouch for the root ({why}): full walk");
            }
            let nodes = scan::scan(ctx.root.fd(), &opts)?;
            let w = WalkReport {
                mode: "full",
                fallback,
                ..WalkReport::default()
            };
            (nodes, w)
        }
    };
    report.walk = WalkReport {
        objects: nodes.len() as u64,
        from_stamps: nodes.iter().filter(|n| n.cached).count() as u64,
        ..walk
    };
    Ok(Walk {
        cur,
        running,
        preserve,
        stamps: stamps.as_ref().and_then(|s| s.sum()),
        walk_start,
        key,
        nodes,
    })
}

/// What shapes a walk besides the tree: a tracked walk reuses only a walk
/// made with the same.
fn walk_key(ctx: &Ctx<'_>, running: Option<&str>) -> String {
    format!("{:?}|{running:?}|{}", ctx.cfg.preserve, stage::STAGE_AT_TOP)
}

/// Hand the walk's objects to the change tracker for the next walk, each
/// with the content the plan took it to hold.
pub(super) fn hand_back(ctx: &Ctx<'_>, s: Survey) {
    let Some(tr) = &ctx.opts.tracker else { return };
    let mut nodes = s.nodes;
    for (n, d) in nodes.iter_mut().zip(s.plan.root_digests) {
        if n.stat.ftype == crate::format::manifest::FileType::File {
            n.known = d;
        }
        n.cached = false;
    }
    tr.finish(nodes, s.walk_key, s.walk_start);
}

/// Plan the update; also the kernel of the current image, as far as the
/// record tells.
fn plan_changes(
    ctx: &Ctx<'_>,
    t: &Target,
    w: &Walk,
    report: &ApplyReport,
) -> Result<(Plan, Option<KernelInfo>)> {
    let target = t.manifest();
    let cur = &w.cur;
    // The node's record of its current image says what each unchanged root
    // file holds (even where two images share size and mtime but not
    // content). When the stamp cache vouches for the unchanged inodes, the
    // record is parsed only if the plan needs it to settle a conflict.
    let mut parsed_current: Option<Manifest> = None;
    // A mostly cold cache (a root changed moments ago) would leave many
    // same-size files to hash: the record is cheaper then.
    let known = report.walk.from_stamps + report.walk.from_tracking;
    let stamps_cover = known * 10 >= report.walk.objects * 9;
    if !cur.same_as_target && !stamps_cover {
        parsed_current = cur.parse();
    }
    let plan_with =
        |current: Option<&Manifest>| plan_against(ctx.root.fd(), target, w, current, t.threads);
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
    let current_kernel = current
        .and_then(|c| c.kernel.as_ref())
        .or(cur.kernel.as_ref())
        .cloned();
    Ok((p, current_kernel))
}

/// One plan against `current` (the record of the current image, if
/// parsed). Without the record (first apply, or not parsed), size and
/// mtime alone do not prove content: same-size files the stamp cache does
/// not vouch for are hashed.
fn plan_against(
    root_fd: BorrowedFd<'_>,
    target: &Manifest,
    w: &Walk,
    current: Option<&Manifest>,
    threads: usize,
) -> Result<Plan> {
    let to_hash = plan::needs_hash(target, &w.nodes, current, current.is_none());
    let hashed = crate::sys::par::par_map(&to_hash, threads, |p| {
        let f = fsx::open_file_beneath(root_fd, p).with_context(|| format!("opening {p}"))?;
        Ok((
            p.clone(),
            crate::format::stream::digest_of(std::io::BufReader::with_capacity(256 * 1024, f))?.0,
        ))
    })?;
    let digests: crate::sys::fastmap::HashMap<RelPath, _> = hashed.into_iter().collect();
    let view = RootView {
        nodes: &w.nodes,
        digests: &digests,
    };
    Ok(plan::plan(target, &view, current, &w.preserve))
}

/// Kernel: compare with the running kernel only on the real root.
fn kernel_verdict(
    ctx: &Ctx<'_>,
    target: &Manifest,
    current_kernel: Option<KernelInfo>,
    running: Option<&str>,
) -> KernelVerdict {
    let host = ctx.root.is_host_root();
    let reason = kernel::change_reason(
        target.kernel.as_ref(),
        current_kernel.as_ref(),
        if host { running } else { None },
    );
    KernelVerdict {
        changed: reason.is_some(),
        reason,
        target_release: target.kernel.as_ref().map(|k| k.release.clone()),
        policy: Some(ctx.opts.kernel_policy.unwrap_or(ctx.cfg.kernel_policy)),
        target_kernel: target.kernel.clone(),
        action: None,
    }
}
