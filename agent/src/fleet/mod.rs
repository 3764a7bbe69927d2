//! Fleet rollout (SPEC §10): at most `max_unavailable` nodes of a group
//! disrupted at once, each proving itself healthy before it gives its slot
//! back, coordinated through etcd with no coordinator of our own.
//!
//! This layer owns the `[rollout]`/`[health]` settings ([`config`]), the
//! etcd client ([`etcd`]), the key layout and its pure view ([`group`]), the
//! slot state machine ([`slot`]), the node's coordinator ([`coord`]), the
//! health gate ([`health`]), phased buckets ([`bucket`]), maintenance
//! windows ([`window`], in the clock of [`zone`]) and the operator commands ([`ops`]). It may use the
//! engine (apply, rollback, the journal, hooks' naming rules) and the
//! node's configuration and runtime directory; the engine knows it only
//! through the [`SlotGate`] in the apply options, called once between the
//! durability sync and the pre-apply hooks.

pub mod bucket;
pub mod config;
pub mod coord;
pub mod etcd;
pub mod group;
pub mod health;
pub mod ops;
pub mod slot;
pub mod window;
pub mod zone;

#[cfg(test)]
mod reboot_tests;

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

pub use coord::Rollout;
use slot::{SlotEvent, SlotPhase};

pub use crate::apply::gate::SlotGate;
use crate::apply::ApplyReport;
use crate::engine::config::Config;
use crate::fs::rootfs::RootFs;
use crate::sys::error::ExitKind;
use crate::sys::progress::Progress;

impl SlotGate for Rollout {
    fn before_quiesce(&self, target: &str) -> Result<()> {
        self.acquire(target).map(|_| ())
    }
}

/// File name of the node's memory of a target that failed its gate, in
/// the runtime directory.
pub const FAILED_NAME: &str = "health-failed.json";

/// A target this node rolled back from; not retried until the metadata
/// names another image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedTarget {
    /// The image that failed.
    pub target: String,
    /// The image the node went back to.
    pub back_to: Option<String>,
    /// The failed checks.
    pub reason: String,
}

/// The `status` lines of the health gate and the rollout, for the runtime
/// directory `rt`.
pub fn print_status(rt: &Path) {
    if let Some(h) = health::load(rt) {
        println!("health:   {}", h.summary());
    }
    if let Some(f) = failed_target(rt) {
        println!(
            "failed:   {} (not retried until the metadata names another image)",
            f.target
        );
    }
    if let Some(f) = coord::FleetRecord::load(rt) {
        println!(
            "rollout:  {} of {}: {} {}",
            f.node, f.group, f.state.state, f.state.why
        );
        if let Some(h) = &f.halted {
            println!(
                "halted:   group {} after {} failure(s) of {}",
                f.group, h.failures, h.target
            );
        }
    }
}

/// Whether an update of `root` keeps what its swap replaces for a rollback
/// in place ([`crate::engine::keep`]): only when the gate can fail (some
/// health check exists) and `[health] rollback` is on.
pub fn keeps_replaced(root: &Path, cfg: &Config) -> bool {
    let rollback = config::health(cfg).map(|h| h.rollback).unwrap_or(true);
    rollback && health::any(root)
}

/// Remember `f` in the runtime directory `rt` (logged when it cannot be).
fn remember_failed(rt: &Path, f: &FailedTarget) {
    let written = serde_json::to_vec_pretty(f)
        .map_err(anyhow::Error::from)
        .and_then(|b| crate::fs::store::write_volatile(&rt.join(FAILED_NAME), &b));
    if let Err(e) = written {
        tracing::error!(
            "cannot remember that {} failed its gate ({}): {e:#}",
            f.target,
            rt.join(FAILED_NAME).display()
        );
    }
}

/// Forget the remembered failed target of `rt` (logged when it cannot be).
fn forget_failed(rt: &Path) {
    match std::fs::remove_file(rt.join(FAILED_NAME)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(
            "cannot forget the failed target {}: {e}",
            rt.join(FAILED_NAME).display()
        ),
    }
}

/// The remembered failed target of `rt`, if any.
pub fn failed_target(rt: &Path) -> Option<FailedTarget> {
    std::fs::read(rt.join(FAILED_NAME))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Why the agent must not start an update to `id` now, if it must not:
/// the node rolled back from `id` before, or `id`'s phased rollout does
/// not include the node yet (`percent`: the metadata's value under the
/// rollout's `percent_key`, see [`Rollout::percent_key`]). An
/// interrupted update (`resume`) is always converged.
pub fn hold_back(
    root: &Path,
    rollout: Option<&Rollout>,
    percent: Option<&serde_json::Value>,
    id: &str,
    resume: bool,
) -> Option<String> {
    if resume {
        return None;
    }
    let rt = RootFs::open(root).ok()?.runtime_dir();
    match failed_target(&rt) {
        Some(f) if f.target == id => {
            let why = format!("{id} failed its health gate here ({}); waiting for the metadata to name another image", f.reason);
            if let Some(r) = rollout {
                r.publish("failed", &why, Some(id));
            }
            return Some(why);
        }
        Some(_) => forget_failed(&rt),
        None => {}
    }
    let r = rollout?;
    let key = r.percent_key();
    let pct = match percent.map(bucket::parse_percent) {
        None => None,
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            let why = format!("metadata key {key}: {e}; not starting {id}");
            r.publish("waiting", &why, Some(id));
            return Some(why);
        }
    };
    if bucket::admitted(id, &r.node, pct) {
        return None;
    }
    let why = format!(
        "phased rollout: bucket {:.2} is not below {key} {}",
        bucket::bucket(id, &r.node),
        pct.unwrap_or(100.0)
    );
    r.publish("waiting", &why, Some(id));
    Some(why)
}

/// After `apply::run` of `id` returned `res`: run the health gate when the
/// update was applied, roll back in place when a required check fails,
/// record the failure (and trip the breaker), and give the slot back.
pub fn settle(
    root: &Path,
    cfg: &Config,
    rollout: Option<&Rollout>,
    id: &str,
    res: Result<ApplyReport>,
    progress: &Progress,
) -> Result<ApplyReport> {
    let applied = match &res {
        Ok(r) => r.result == "applied",
        Err(e) => ExitKind::of(e) == ExitKind::PostApplyHook,
    };
    let holding = rollout.is_some_and(|r| r.phase().holds());
    if !applied {
        if let (true, Some(r)) = (holding, rollout) {
            if root_mixed(root) {
                tracing::warn!("rollout: the update stopped part-way; the slot stays claimed until the node converges");
                return res;
            }
            r.step(SlotEvent::Aborted, None);
            if let Err(e) = r.release() {
                tracing::error!("rollout: {e:#}");
            }
        }
        return res;
    }
    if let Ok(r) = &res {
        if r.rollback_in_place {
            return finish_rollback(root, rollout, id, res);
        }
        tracing::info!(
            "applied {id} in {} ms (swap {} ms)",
            r.total_ms,
            r.phases.get("swap").copied().unwrap_or(0)
        );
    }
    let from = res.as_ref().ok().and_then(|r| r.from_id.clone());
    let rebooting = res.as_ref().ok().and_then(|r| r.kernel.action.as_deref());
    if let (Some(r), Some(a @ ("kexec" | "reboot"))) = (rollout.filter(|_| holding), rebooting) {
        // The gate runs after the boot (the agent's start finds the claim).
        r.step(SlotEvent::Applied, None);
        r.step(SlotEvent::Reboot, None);
        r.publish(
            "across-reboot",
            &format!(
                "{a} into the new kernel; the slot is kept until the gate passes after the boot"
            ),
            Some(id),
        );
        return res;
    }
    match gate(root, cfg, rollout, id, from.as_deref(), progress) {
        Ok(()) => res,
        Err(e) => Err(e),
    }
}

/// A rollback in place that an earlier run began and this run finished
/// (the agent was killed during it and converged its journal): no gate
/// for the image it went back to; record the failure the gate found, drop
/// the keep area, give the slot back.
fn finish_rollback(
    root: &Path,
    rollout: Option<&Rollout>,
    id: &str,
    res: Result<ApplyReport>,
) -> Result<ApplyReport> {
    crate::apply::drop_kept(root);
    let rt = RootFs::open(root)?.runtime_dir();
    let failed = failed_target(&rt);
    match &failed {
        Some(f) => {
            tracing::info!(
                "finished the interrupted rollback in place from {} to {id}",
                f.target
            );
            remember_failed(
                &rt,
                &FailedTarget {
                    back_to: Some(id.to_owned()),
                    ..f.clone()
                },
            );
        }
        None => tracing::warn!(
            "finished an interrupted rollback in place to {id}; the failed target is not remembered here"
        ),
    }
    if let Some(r) = rollout.filter(|r| r.phase().holds()) {
        r.step(SlotEvent::Applied, None);
        r.step(SlotEvent::Failed, None);
        if let Some(f) = &failed {
            match r.record_failure(&f.target, &f.reason, true) {
                Ok(true) => tracing::error!("rollout: group halted after {} failed here", f.target),
                Ok(false) => {}
                Err(e) => tracing::error!("rollout: cannot record the failure: {e:#}"),
            }
        }
        r.step(SlotEvent::RolledBack, None);
        r.release()?;
    }
    res
}

fn root_mixed(root: &Path) -> bool {
    RootFs::open(root)
        .ok()
        .and_then(|r| r.state_dir().ok().flatten())
        .and_then(|s| {
            crate::engine::journal::Journal::load(s.as_fd())
                .ok()
                .flatten()
        })
        .is_some_and(|j| j.interrupted())
}

/// The gate, the rollback and the release, for a node on `id` (holding a
/// slot when `rollout` is set).
pub fn gate(
    root: &Path,
    cfg: &Config,
    rollout: Option<&Rollout>,
    id: &str,
    from: Option<&str>,
    progress: &Progress,
) -> Result<()> {
    let rt = RootFs::open(root)?.runtime_dir();
    if rollout.is_none() && !health::any(root) {
        return Ok(());
    }
    if let Some(r) = rollout {
        if r.phase() == SlotPhase::Holding {
            r.step(SlotEvent::Applied, None);
        }
        r.publish("gating", "running the health checks", Some(id));
    }
    let hc = config::health(cfg).unwrap_or_else(|e| {
        tracing::error!("{e:#}; using the default [health] settings");
        Default::default()
    });
    let rep = health::run_gate(root, &hc, id, from);
    if let Err(e) = health::save(&rt, &rep) {
        tracing::warn!("cannot keep the health report: {e:#}");
    }
    tracing::info!("{}", rep.summary());
    if rep.passed {
        forget_failed(&rt);
        crate::apply::drop_kept(root);
        if let Some(r) = rollout {
            r.step(SlotEvent::Passed, None);
            r.clear_failure();
            r.release()?;
        }
        return Ok(());
    }
    let reason = rep.required_failed.join(", ");
    if let Some(r) = rollout {
        r.step(SlotEvent::Failed, None);
        r.publish(
            "rolling-back",
            &format!("required checks failed: {reason}"),
            Some(id),
        );
    }
    // Remembered before the rollback starts: an agent killed during it
    // resumes the rollback (its journal) and still knows the failed target.
    let mut ft = FailedTarget {
        target: id.to_owned(),
        back_to: None,
        reason: reason.clone(),
    };
    remember_failed(&rt, &ft);
    let back = if hc.rollback {
        match crate::apply::rollback_in_place(root, progress) {
            Ok(rb) => {
                tracing::info!(
                    "rolled back in place from {id} to {} in {} ms (swap {} ms; {} HTTP requests)",
                    rb.id,
                    rb.total_ms,
                    rb.phases.get("swap").copied().unwrap_or(0),
                    rb.download.as_ref().map_or(0, |d| d.requests)
                );
                Some(rb.id)
            }
            Err(e) => {
                tracing::error!("rollback from {id} failed: {e:#}");
                None
            }
        }
    } else {
        None
    };
    if back.is_some() {
        ft.back_to = back.clone();
        remember_failed(&rt, &ft);
    }
    if let Some(r) = rollout {
        match r.record_failure(id, &reason, back.is_some()) {
            Ok(true) => tracing::error!("rollout: group halted after {id} failed here"),
            Ok(false) => {}
            Err(e) => tracing::error!("rollout: cannot record the failure: {e:#}"),
        }
        r.step(SlotEvent::RolledBack, None);
        r.release()?;
    }
    Err(anyhow!(
        "the health gate failed for {id} (required checks failed: {reason}); {}",
        match &back {
            Some(b) => format!("rolled back in place to {b}"),
            None => "the node was NOT rolled back".into(),
        }
    ))
}

/// At agent start: a claim this node left in etcd (it died inside its
/// window) whose target the root already runs is settled now: gate, then
/// release. A claim whose update is unfinished is taken up by the next
/// apply instead (its slot gate finds the claim again).
pub fn recover(root: &Path, cfg: &Config, r: &Rollout) -> Result<()> {
    let Some((slot, claim)) = r.own_claim()? else {
        return Ok(());
    };
    let current = RootFs::open(root)?.image_id()?;
    if current.as_deref() != Some(claim.target.as_str()) || root_mixed(root) {
        tracing::info!(
            "rollout: our in-progress record (slot {slot}, {}) stays until the update converges",
            claim.target
        );
        return Ok(());
    }
    tracing::info!(
        "rollout: found our in-progress record for slot {slot}; running the gate for {}",
        claim.target
    );
    if r.phase() == SlotPhase::AcrossReboot {
        r.step(SlotEvent::Booted, None);
    } else {
        r.readopt(slot, &claim)?;
    }
    gate(
        root,
        cfg,
        Some(r),
        &claim.target,
        None,
        &Progress::new(false),
    )
}
