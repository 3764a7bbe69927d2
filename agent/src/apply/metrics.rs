//! The metrics of the last apply, from the status record it leaves
//! ([`crate::engine::status::Status`]): what the node runs, how the last
//! attempt ended and when, its phase durations and quiesce window, what it
//! fetched, and whether a reboot is required. Rendered into the node's
//! textfile by [`crate::agent::metrics`] after every apply (see
//! docs/metrics.md).

use crate::engine::status::Status;
use crate::sys::metrics::{Exposition, Family, Kind};

/// The image the root matches (`etc/image_id`), as a label; value 1.
pub const IMAGE_INFO: Family = Family {
    name: "imageupd_image_info",
    kind: Kind::Gauge,
    help: "The image the root runs (label image; value 1).",
};
/// How the last apply ended: one sample per result, 1 for the last one.
pub const LAST_RESULT: Family = Family {
    name: "imageupd_last_apply_result",
    kind: Kind::Gauge,
    help: "How the last apply ended: 1 for its result (applied, nothing-to-do, failed, failed-committed), 0 for the others.",
};
/// When the last apply's record was written, Unix seconds.
pub const LAST_TIME: Family = Family {
    name: "imageupd_last_apply_timestamp_seconds",
    kind: Kind::Gauge,
    help: "When the last apply finished (Unix time, seconds).",
};
/// The last apply's wall time, seconds.
pub const LAST_DURATION: Family = Family {
    name: "imageupd_last_apply_duration_seconds",
    kind: Kind::Gauge,
    help: "Wall time of the last apply that finished, seconds.",
};
/// Each phase of the last apply, seconds.
pub const PHASE: Family = Family {
    name: "imageupd_last_apply_phase_seconds",
    kind: Kind::Gauge,
    help: "Duration of each phase of the last apply that finished, seconds (label phase).",
};
/// The service downtime of the last apply, seconds.
pub const QUIESCE: Family = Family {
    name: "imageupd_last_apply_quiesce_seconds",
    kind: Kind::Gauge,
    help: "Quiesce window of the last apply (pre-apply hooks start to post-apply hooks start), seconds.",
};
/// Response bytes the last apply received over HTTP(S).
pub const FETCHED_BYTES: Family = Family {
    name: "imageupd_last_apply_fetched_bytes",
    kind: Kind::Gauge,
    help: "Response body bytes the last apply received over HTTP(S) (0 for a local source).",
};
/// HTTP requests the last apply sent.
pub const FETCH_REQUESTS: Family = Family {
    name: "imageupd_last_apply_fetch_requests",
    kind: Kind::Gauge,
    help: "HTTP requests the last apply sent, retries included.",
};
/// Objects the last apply downloaded and verified.
pub const FETCHED_OBJECTS: Family = Family {
    name: "imageupd_last_apply_fetched_objects",
    kind: Kind::Gauge,
    help: "Objects the last apply downloaded and verified.",
};
/// Whether the node must boot another kernel.
pub const REBOOT_REQUIRED: Family = Family {
    name: "imageupd_reboot_required",
    kind: Kind::Gauge,
    help: "1 when the node must boot the image's kernel to complete the update.",
};

/// Every family of this file, for docs/metrics.md's test.
pub const FAMILIES: [&Family; 10] = [
    &IMAGE_INFO,
    &LAST_RESULT,
    &LAST_TIME,
    &LAST_DURATION,
    &PHASE,
    &QUIESCE,
    &FETCHED_BYTES,
    &FETCH_REQUESTS,
    &FETCHED_OBJECTS,
    &REBOOT_REQUIRED,
];

/// The results an apply ends with ([`Status::result`]).
pub const RESULTS: [&str; 4] = ["applied", "nothing-to-do", "failed", "failed-committed"];

/// Add the apply's metrics from `status` (none recorded yet: only the
/// families' HELP and TYPE lines, and reboot-required 0).
pub fn render(e: &mut Exposition, status: Option<&Status>) {
    let Some(s) = status else {
        for f in FAMILIES {
            if f.name == REBOOT_REQUIRED.name {
                e.sample(f, &[], 0.0);
            } else {
                e.declare(f);
            }
        }
        return;
    };
    match &s.current {
        Some(id) => e.sample(&IMAGE_INFO, &[("image", id)], 1.0),
        None => e.declare(&IMAGE_INFO),
    }
    for r in RESULTS {
        e.sample(
            &LAST_RESULT,
            &[("result", r)],
            f64::from(u8::from(s.result == r)),
        );
    }
    if !RESULTS.contains(&s.result.as_str()) {
        // E.g. in-progress, written by an apply that was killed.
        e.sample(&LAST_RESULT, &[("result", &s.result)], 1.0);
    }
    match parse_time(&s.updated) {
        Some(t) => e.sample(&LAST_TIME, &[], t),
        None => e.declare(&LAST_TIME),
    }
    match s.total_ms {
        Some(ms) => e.sample(&LAST_DURATION, &[], secs(ms)),
        None => e.declare(&LAST_DURATION),
    }
    e.declare(&PHASE);
    for (phase, ms) in &s.phases_ms {
        e.sample(&PHASE, &[("phase", phase)], secs(*ms));
    }
    match s.quiesce_ms {
        Some(ms) => e.sample(&QUIESCE, &[], secs(ms)),
        None => e.declare(&QUIESCE),
    }
    let d = s.download.clone().unwrap_or_default();
    e.sample(&FETCHED_BYTES, &[], d.bytes as f64);
    e.sample(&FETCH_REQUESTS, &[], d.requests as f64);
    e.sample(&FETCHED_OBJECTS, &[], d.objects as f64);
    e.sample(
        &REBOOT_REQUIRED,
        &[],
        f64::from(u8::from(s.reboot_required)),
    );
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// RFC 3339 to Unix seconds.
fn parse_time(s: &str) -> Option<f64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lifecycle::Phase;

    fn status() -> Status {
        Status {
            phase: Phase::Idle,
            current: Some("v2".into()),
            target: Some("v2".into()),
            source: None,
            result: "applied".into(),
            last_error: None,
            reboot_required: true,
            reboot_reason: None,
            phases_ms: [("fetch".to_string(), 1500), ("swap".to_string(), 20)].into(),
            quiesce_ms: Some(250),
            total_ms: Some(4000),
            download: Some(crate::net::fetch::DownloadReport {
                bytes: 12345,
                requests: 7,
                objects: 5,
                ..Default::default()
            }),
            updated: "2026-01-02T03:04:05Z".into(),
            pid: 1,
        }
    }

    #[test]
    fn a_finished_apply() {
        let mut e = Exposition::new();
        render(&mut e, Some(&status()));
        let t = e.finish();
        for want in [
            "imageupd_image_info{image=\"v2\"} 1\n",
            "imageupd_last_apply_result{result=\"applied\"} 1\n",
            "imageupd_last_apply_result{result=\"failed\"} 0\n",
            "imageupd_last_apply_timestamp_seconds 1767323045\n",
            "imageupd_last_apply_duration_seconds 4\n",
            "imageupd_last_apply_phase_seconds{phase=\"fetch\"} 1.5\n",
            "imageupd_last_apply_phase_seconds{phase=\"swap\"} 0.02\n",
            "imageupd_last_apply_quiesce_seconds 0.25\n",
            "imageupd_last_apply_fetched_bytes 12345\n",
            "imageupd_last_apply_fetch_requests 7\n",
            "imageupd_last_apply_fetched_objects 5\n",
            "imageupd_reboot_required 1\n",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
        for f in FAMILIES {
            assert!(
                t.contains(&format!("# TYPE {} gauge\n", f.name)),
                "{}",
                f.name
            );
        }
    }

    #[test]
    fn an_unknown_result_is_shown_and_nothing_recorded_yet_is_declared() {
        let mut s = status();
        s.result = "in-progress".into();
        let mut e = Exposition::new();
        render(&mut e, Some(&s));
        let t = e.finish();
        assert!(t.contains("imageupd_last_apply_result{result=\"in-progress\"} 1\n"));
        assert!(t.contains("imageupd_last_apply_result{result=\"applied\"} 0\n"));
        let mut e = Exposition::new();
        render(&mut e, None);
        let t = e.finish();
        assert!(t.contains("imageupd_reboot_required 0\n"), "{t}");
        assert!(!t.contains("imageupd_image_info{"), "{t}");
    }
}
