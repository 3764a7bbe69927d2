//! `imageupd serve`'s metrics, served at `/metrics` (on the store's
//! listener, or on `--metrics-listen` alone): requests and response bytes
//! by kind of file and status class, requests in flight, and errors (see
//! docs/metrics.md).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use crate::fs::store::MARKER;
use crate::sys::metrics::{Exposition, Family, Kind};

/// Requests answered, by kind and status class.
pub const REQUESTS: Family = Family {
    name: "imageupd_serve_requests_total",
    kind: Kind::Counter,
    help: "Requests answered, by kind of file (manifest, pack, delta, object, disk, other) and status class (2xx, 3xx, 4xx, 5xx).",
};
/// Response body bytes, by kind and status class.
pub const BYTES: Family = Family {
    name: "imageupd_serve_response_bytes_total",
    kind: Kind::Counter,
    help: "Response body bytes sent (Content-Length of each answer; 0 for HEAD and 304), by kind and status class.",
};
/// Requests being answered now (a body still streaming counts).
pub const IN_FLIGHT: Family = Family {
    name: "imageupd_serve_requests_in_flight",
    kind: Kind::Gauge,
    help: "Requests being answered now, a response body still being sent included.",
};
/// Server-side errors.
pub const ERRORS: Family = Family {
    name: "imageupd_serve_errors_total",
    kind: Kind::Counter,
    help: "Server-side errors: 5xx answers and response bodies that failed while being sent.",
};

/// Every family of this file, for docs/metrics.md's test.
pub const FAMILIES: [&Family; 4] = [&REQUESTS, &BYTES, &IN_FLIGHT, &ERRORS];

/// What a request asked for, as the metrics label it.
pub const KINDS: [&str; 6] = ["manifest", "pack", "delta", "object", "disk", "other"];
/// Status classes.
pub const CLASSES: [&str; 4] = ["2xx", "3xx", "4xx", "5xx"];

/// The kind (index into [`KINDS`]) of a request path: the index, the
/// marker and images' manifests and signatures are `manifest`,
/// `images/<id>/deltas/` `delta`, `objects/` `object`, `packs/` `pack`,
/// `disks/` `disk`; anything else `other`.
pub fn kind_of(path: &str) -> usize {
    let p = path.strip_prefix('/').unwrap_or(path);
    let top = p.split('/').next().unwrap_or("");
    match top {
        "objects" => 3,
        "packs" => 1,
        "disks" => 4,
        "images" if p.contains("/deltas/") => 2,
        "images" => 0,
        "index.json" => 0,
        t if t == MARKER => 0,
        _ => 5,
    }
}

/// Status class index into [`CLASSES`]; 1xx and others count as 5xx
/// (the server never sends them).
pub fn class_of(status: u16) -> usize {
    match status {
        200..=299 => 0,
        300..=399 => 1,
        400..=499 => 2,
        _ => 3,
    }
}

/// The counters, shared by every connection.
#[derive(Default)]
pub struct ServeMetrics {
    requests: [[AtomicU64; 4]; 6],
    bytes: [[AtomicU64; 4]; 6],
    in_flight: AtomicI64,
    errors: AtomicU64,
}

/// Counts a request in flight until dropped.
pub struct InFlight(Arc<ServeMetrics>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServeMetrics {
    /// A request starts.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// A request to `path` was answered with `status` and a body of `bytes`.
    pub fn answered(&self, path: &str, status: u16, bytes: u64) {
        let (k, c) = (kind_of(path), class_of(status));
        self.requests[k][c].fetch_add(1, Ordering::Relaxed);
        self.bytes[k][c].fetch_add(bytes, Ordering::Relaxed);
        if c == 3 {
            self.error();
        }
    }

    /// A server-side error (a 5xx, or a body that failed mid-way).
    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut e = Exposition::new();
        for (fam, arr) in [(&REQUESTS, &self.requests), (&BYTES, &self.bytes)] {
            for (k, kind) in KINDS.iter().enumerate() {
                for (c, class) in CLASSES.iter().enumerate() {
                    e.sample(
                        fam,
                        &[("kind", kind), ("status", class)],
                        arr[k][c].load(Ordering::Relaxed) as f64,
                    );
                }
            }
        }
        e.sample(
            &IN_FLIGHT,
            &[],
            self.in_flight.load(Ordering::Relaxed) as f64,
        );
        e.sample(&ERRORS, &[], self.errors.load(Ordering::Relaxed) as f64);
        e.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_of_paths() {
        for (p, k) in [
            ("/index.json", "manifest"),
            ("/imageupd-store.json", "manifest"),
            ("/images/v2/manifest.json.zst", "manifest"),
            ("/images/v2/manifest.json.zst.sig", "manifest"),
            ("/images/v2/deltas/v1.delta", "delta"),
            ("/objects/ab/abcdef", "object"),
            ("/packs/p1.pack", "pack"),
            ("/disks/v2.raw", "disk"),
            ("/etc/passwd", "other"),
            ("/", "other"),
        ] {
            assert_eq!(KINDS[kind_of(p)], k, "{p}");
        }
        assert_eq!(CLASSES[class_of(206)], "2xx");
        assert_eq!(CLASSES[class_of(304)], "3xx");
        assert_eq!(CLASSES[class_of(404)], "4xx");
        assert_eq!(CLASSES[class_of(500)], "5xx");
    }

    #[test]
    fn counts_and_in_flight() {
        let m = Arc::new(ServeMetrics::default());
        let g = m.begin();
        m.answered("/objects/ab/abcd", 200, 100);
        m.answered("/objects/ab/abce", 200, 50);
        m.answered("/objects/ab/abcf", 404, 10);
        m.answered("/index.json", 500, 15);
        let t = m.render();
        for want in [
            "imageupd_serve_requests_total{kind=\"object\",status=\"2xx\"} 2\n",
            "imageupd_serve_requests_total{kind=\"object\",status=\"4xx\"} 1\n",
            "imageupd_serve_response_bytes_total{kind=\"object\",status=\"2xx\"} 150\n",
            "imageupd_serve_response_bytes_total{kind=\"manifest\",status=\"5xx\"} 15\n",
            "imageupd_serve_requests_total{kind=\"disk\",status=\"2xx\"} 0\n",
            "imageupd_serve_requests_in_flight 1\n",
            "imageupd_serve_errors_total 1\n",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
        drop(g);
        assert!(m.render().contains("imageupd_serve_requests_in_flight 0\n"));
    }
}
