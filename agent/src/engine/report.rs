//! What an apply or plan reports: the `--json` document and its rendering
//! for humans.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::config::KernelPolicy;
use crate::engine::plan::PlanStats;
use crate::engine::stage::StageReport;
use crate::engine::swap::SwapReport;
use crate::sys::progress::human_bytes;

/// Kernel verdict.
#[derive(Serialize, Debug, Default, Clone)]
pub struct KernelVerdict {
    /// A reboot into another kernel is needed.
    pub changed: bool,
    /// Why.
    pub reason: Option<String>,
    /// Target kernel release.
    pub target_release: Option<String>,
    /// Policy that applies.
    pub policy: Option<KernelPolicy>,
    /// The target's kernel, as its manifest records it.
    pub target_kernel: Option<crate::format::manifest::KernelInfo>,
    /// What was done about a change: kexec, reboot, deferred,
    /// not-host-root or failed ([`crate::boot::record::Action`]).
    pub action: Option<String>,
}

/// What the walk of the root read.
#[derive(Serialize, Debug, Default, Clone)]
pub struct WalkReport {
    /// Objects walked (preserved paths excluded).
    pub objects: u64,
    /// Of those, objects whose xattrs and symlink target came from the
    /// stamp cache because their inode had not changed since the last run.
    pub from_stamps: u64,
    /// `full` (every directory listed) or `tracked` (the agent's change
    /// tracking vouched for the rest: only changed directories listed).
    pub mode: &'static str,
    /// Tracked walks: objects taken from the previous walk unread.
    #[serde(skip_serializing_if = "is_zero")]
    pub from_tracking: u64,
    /// Tracked walks: directories listed again.
    #[serde(skip_serializing_if = "is_zero")]
    pub relisted_dirs: u64,
    /// Why the agent's change tracking could not vouch for the interval
    /// since its last walk, so this walk was a full one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// What the node verified of the store's trust metadata.
#[derive(Serialize, Debug, Default, Clone)]
pub struct IndexReport {
    /// Version of the root of trust in force.
    pub root_version: u64,
    /// Root versions taken from the store in this run (rotations).
    pub root_rotations: u64,
    /// Version of the signed index.
    pub version: u64,
    /// When the index was signed, RFC 3339.
    pub issued: String,
    /// Its expiry, RFC 3339.
    pub expires: String,
    /// Seconds since it was signed, at the start of the run.
    pub age_secs: i64,
    /// Past its expiry (accepted only with `allow_expired_index`).
    pub expired: bool,
    /// The newest release the index lists on the target's channel, and
    /// its image: a node told to install an older one can see that.
    pub newest_on_channel: Option<(String, u64)>,
}

/// The outcome, printed by the CLI (human or `--json`).
#[derive(Serialize, Debug, Default)]
pub struct ApplyReport {
    /// "planned", "applied" or "nothing-to-do".
    pub result: String,
    /// Target image.
    pub id: String,
    /// Image the root had before.
    pub from_id: Option<String>,
    /// Source description.
    pub source: String,
    /// The root.
    pub root: String,
    /// Key id that signed the manifest (several, comma-separated, for a
    /// k-of-n root).
    pub signed_by: Option<String>,
    /// The store's signed index, when the node has a root of trust.
    pub index: Option<IndexReport>,
    /// The walk of the root.
    pub walk: WalkReport,
    /// Plan counts.
    pub plan: PlanStats,
    /// Free bytes needed on the root's filesystem.
    pub space_needed: u64,
    /// Free bytes available.
    pub space_free: u64,
    /// Staging counts.
    pub stage: StageReport,
    /// Swap counts.
    pub swap: SwapReport,
    /// Network counters (HTTP(S) sources only).
    pub download: Option<crate::net::fetch::DownloadReport>,
    /// Kernel verdict.
    pub kernel: KernelVerdict,
    /// Duration of each phase, ms.
    pub phases: BTreeMap<String, u64>,
    /// Pre-apply start to post-apply start, ms: the service downtime.
    pub quiesce_ms: Option<u64>,
    /// Total wall time, ms.
    pub total_ms: u64,
    /// An interrupted update was found and resumed.
    pub resumed: bool,
    /// The source was the keep area (a rollback in place, `keep+…`).
    pub rollback_in_place: bool,
    /// Things skipped or worth knowing.
    pub warnings: Vec<String>,
}

/// The update pipeline's phases in the order they run, as the apply's
/// stopwatch names them; the human summary lists phases in this order.
pub const PIPELINE: [&str; 8] = [
    "resolve",
    "plan",
    "fetch",
    "stage",
    "sync",
    "pre-apply-hooks",
    "swap",
    "post-apply-hooks",
];

/// `resolve 3 ms, plan 10 ms, …`: the phases in pipeline order, any phase
/// the pipeline does not name after them (alphabetically).
pub fn phases_in_order(phases: &BTreeMap<String, u64>) -> String {
    let rank = |k: &str| {
        PIPELINE
            .iter()
            .position(|p| *p == k)
            .unwrap_or(PIPELINE.len())
    };
    let mut v: Vec<(&String, &u64)> = phases.iter().collect();
    v.sort_by_key(|(k, _)| rank(k));
    v.iter()
        .map(|(k, ms)| format!("{k} {ms} ms"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Render a report for humans.
pub fn human_summary(r: &ApplyReport) -> String {
    let mut s = String::new();
    let p = &r.plan;
    s.push_str(&format!(
        "{} {} at {} ({})\n",
        match r.result.as_str() {
            "planned" => "plan for",
            "applied" => "applied",
            _ => "nothing to do for",
        },
        r.id,
        r.root,
        r.source
    ));
    s.push_str(&format!(
        "  files: +{} added ({}), ~{} changed ({}), -{} deleted ({}), {} metadata-only\n",
        p.added,
        human_bytes(p.added_bytes),
        p.changed,
        human_bytes(p.changed_bytes),
        p.deleted,
        human_bytes(p.deleted_bytes),
        p.metadata_only
    ));
    if p.fetch_objects == 0 && p.local_copies == 0 {
        s.push_str("  content: nothing to fetch or stage\n");
    } else {
        s.push_str(&format!(
            "  content: {} to fetch in {} objects, {} local copies; staging needs {} of {} free\n",
            human_bytes(p.fetch_bytes),
            p.fetch_objects,
            p.local_copies,
            human_bytes(r.space_needed),
            human_bytes(r.space_free)
        ));
    }
    if let Some(d) = &r.download {
        s.push_str(&format!(
            "  download: {} in {} requests ({} retries, {} resumed); {} objects downloaded, {} from the cache\n",
            human_bytes(d.bytes),
            d.requests,
            d.retries,
            d.resumed,
            d.objects,
            d.cached_objects
        ));
    }
    match (&r.kernel.changed, &r.kernel.reason) {
        (true, Some(why)) => s.push_str(&format!(
            "  kernel: changes ({why}): the node must boot {}; policy {}{}\n",
            r.kernel
                .target_release
                .as_deref()
                .unwrap_or("the new kernel"),
            crate::engine::config::policy_word(r.kernel.policy.unwrap_or(KernelPolicy::Kexec)),
            r.kernel
                .action
                .as_deref()
                .map(|a| format!(", done: {a}"))
                .unwrap_or_default()
        )),
        _ => s.push_str("  kernel: unchanged\n"),
    }
    if !r.phases.is_empty() {
        s.push_str(&format!("  phases: {}\n", phases_in_order(&r.phases)));
    }
    if let Some(q) = r.quiesce_ms {
        s.push_str(&format!(
            "  quiesce window: {q} ms; total {} ms\n",
            r.total_ms
        ));
    }
    for w in &r.warnings {
        s.push_str(&format!("  warning: {w}\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_print_in_pipeline_order() {
        let mut m = BTreeMap::new();
        for (k, v) in [
            ("swap", 5),
            ("fetch", 2),
            ("post-apply-hooks", 7),
            ("resolve", 1),
            ("pre-apply-hooks", 4),
            ("plan", 3),
            ("sync", 6),
            ("stage", 8),
        ] {
            m.insert(k.to_string(), v);
        }
        assert_eq!(
            phases_in_order(&m),
            "resolve 1 ms, plan 3 ms, fetch 2 ms, stage 8 ms, sync 6 ms, \
             pre-apply-hooks 4 ms, swap 5 ms, post-apply-hooks 7 ms"
        );
    }

    #[test]
    fn no_staging_line_when_nothing_to_stage() {
        let r = ApplyReport {
            result: "nothing-to-do".into(),
            space_needed: 64 << 20,
            ..Default::default()
        };
        let s = human_summary(&r);
        assert!(!s.contains("staging needs"), "{s}");
        assert!(s.contains("nothing to fetch or stage"), "{s}");
        let mut r2 = r;
        r2.plan.fetch_objects = 3;
        assert!(human_summary(&r2).contains("staging needs 64.0 MiB"));
    }
}
