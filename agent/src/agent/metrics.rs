//! The node's metrics textfile, in the format node_exporter's textfile
//! collector reads: the last apply's metrics ([`crate::apply::metrics`])
//! and the agent's failures and backoff, declared here. Written after
//! every apply (the command line's `apply`, `rollback`, `apply
//! --from-metadata`, and the agent's) to the configuration's
//! `metrics_file` (a path on the node), by default `metrics.prom` in the
//! root's runtime directory; replaced atomically (temp file + rename), so
//! the collector never reads half a file.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::agent::record::AgentRecord;
use crate::engine::config::Config;
use crate::engine::status::Status;
use crate::fs::rootfs::RootFs;
use crate::sys::metrics::{Exposition, Family, Kind};

/// File name of the default textfile, in the root's runtime directory.
pub const DEFAULT_METRICS_NAME: &str = "metrics.prom";

/// Targets whose updates failed and are being retried with backoff.
pub const FAILING_TARGETS: Family = Family {
    name: "imageupd_agent_failing_targets",
    kind: Kind::Gauge,
    help: "Targets (image and source) whose last update attempt failed and that are retried with backoff.",
};
/// Failed attempts of those targets, summed.
pub const FAILED_ATTEMPTS: Family = Family {
    name: "imageupd_agent_failed_attempts",
    kind: Kind::Gauge,
    help: "Consecutive failed update attempts of the failing targets, summed (0 after a success).",
};
/// When the next retry of a failing target is due.
pub const NEXT_RETRY: Family = Family {
    name: "imageupd_agent_next_retry_timestamp_seconds",
    kind: Kind::Gauge,
    help: "When the earliest retry of a failing target is due (Unix time, seconds); absent when nothing fails.",
};
/// The backoff delay before that retry.
pub const BACKOFF: Family = Family {
    name: "imageupd_agent_backoff_seconds",
    kind: Kind::Gauge,
    help: "Backoff delay between the last failed attempt and its retry, seconds (0 when nothing fails).",
};

/// Every family of this file, for docs/metrics.md's test.
pub const FAMILIES: [&Family; 4] = [&FAILING_TARGETS, &FAILED_ATTEMPTS, &NEXT_RETRY, &BACKOFF];

/// The whole textfile: the last apply's metrics, then the agent's.
pub fn render(status: Option<&Status>, agent: &AgentRecord) -> String {
    let mut e = Exposition::new();
    crate::apply::metrics::render(&mut e, status);
    let book = &agent.failures.by_target;
    e.sample(&FAILING_TARGETS, &[], book.len() as f64);
    e.sample(
        &FAILED_ATTEMPTS,
        &[],
        book.values().map(|f| f64::from(f.attempts)).sum(),
    );
    match book.values().min_by_key(|f| f.next_retry_ms) {
        Some(f) => {
            e.sample(&NEXT_RETRY, &[], f.next_retry_ms as f64 / 1000.0);
            e.sample(
                &BACKOFF,
                &[],
                f.next_retry_ms.saturating_sub(f.last_attempt_ms) as f64 / 1000.0,
            );
        }
        None => {
            e.declare(&NEXT_RETRY);
            e.sample(&BACKOFF, &[], 0.0);
        }
    }
    e.finish()
}

/// Where the textfile of `root` goes: `metrics_file` below the root (it
/// names a path on the node), else the default in the runtime directory.
pub fn path(root: &RootFs, cfg: &Config) -> PathBuf {
    match &cfg.metrics_file {
        Some(p) => root.path.join(p.strip_prefix("/").unwrap_or(p)),
        None => root.runtime_dir().join(DEFAULT_METRICS_NAME),
    }
}

/// Write the textfile of `root` from its status and agent records;
/// returns its path.
pub fn write(root: &RootFs, cfg: &Config) -> Result<PathBuf> {
    let rt = root.runtime_dir();
    let status = Status::load(&rt)?;
    let agent = AgentRecord::load(&rt)?;
    let p = path(root, cfg);
    write_file(&p, &render(status.as_ref(), &agent))?;
    Ok(p)
}

/// Open `root`, read its configuration and write its textfile (for the
/// command line, after an apply).
pub fn write_for(root: &Path) -> Result<PathBuf> {
    let rf = RootFs::open(root)?;
    let cfg = Config::load(&rf.path)?;
    write(&rf, &cfg)
}

fn write_file(p: &Path, text: &str) -> Result<()> {
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fs::store::write_volatile(p, text.as_bytes())
        .with_context(|| format!("writing the metrics textfile {}", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::backoff::Failure;

    #[test]
    fn docs_list_every_metric() {
        let doc = include_str!("../../../docs/metrics.md");
        let all = crate::apply::metrics::FAMILIES
            .iter()
            .chain(FAMILIES.iter())
            .chain(crate::publish::serve::metrics::FAMILIES.iter());
        let mut n = 0;
        for f in all {
            let kind = match f.kind {
                crate::sys::metrics::Kind::Gauge => "gauge",
                crate::sys::metrics::Kind::Counter => "counter",
            };
            let row = format!("| `{}` | {kind} |", f.name);
            assert!(doc.contains(&row), "docs/metrics.md lacks the row {row}");
            n += 1;
        }
        assert_eq!(n, 18);
    }

    #[test]
    fn failures_and_backoff() {
        let mut r = AgentRecord::default();
        let t = render(None, &r);
        assert!(t.contains("imageupd_agent_failing_targets 0\n"), "{t}");
        assert!(t.contains("imageupd_agent_backoff_seconds 0\n"), "{t}");
        // Declared (HELP/TYPE) but without a sample while nothing fails.
        assert!(
            !t.lines()
                .any(|l| l.starts_with("imageupd_agent_next_retry_timestamp_seconds ")),
            "{t}"
        );
        for (k, a, last, next) in [("v2@a", 3, 10_000, 250_000), ("v3@b", 1, 20_000, 50_000)] {
            r.failures.by_target.insert(
                k.into(),
                Failure {
                    attempts: a,
                    last_error: "boom".into(),
                    last_attempt_ms: last,
                    next_retry_ms: next,
                },
            );
        }
        let t = render(None, &r);
        for want in [
            "imageupd_agent_failing_targets 2\n",
            "imageupd_agent_failed_attempts 4\n",
            "imageupd_agent_next_retry_timestamp_seconds 50\n",
            "imageupd_agent_backoff_seconds 30\n",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
    }
}
