//! Bounded downloads (issue 13, TRUST.md A3 "endless data", "slow
//! retrieval"): the one HTTP test server ([`FileServer`], with Range)
//! answers one kind of request at a time with a hostile body, and the
//! apply v1 -> v2 must stay bounded:
//!
//! - an endless body (the right bytes, then zeros without end) on every
//!   kind of request the agent sends: the store marker, the manifest, its
//!   signature, the frame list, a manifest frame range, the pack index, a
//!   pack range, the update delta (head and payload) and a loose object.
//!   Each is refused (exit 4, root byte-identical) or, where the agent has
//!   another way (frames, deltas), dropped for it (then the oracles are
//!   clean); every run stays under [`MAX_RSS_KIB`] of peak RSS (`time -f
//!   %M`) and the download cache under what v2 declares plus a margin;
//! - a zstd bomb (a few KiB that decompress to GiBs) as an object and as
//!   a (validly signed) manifest: refused by the decompression caps;
//! - a server that trickles the largest object at one byte a second:
//!   aborted by the low-speed window (and, with that off, by the request
//!   deadline), retried, converged; the quiesce window is no longer than
//!   in a normal run, since all of it happens in the fetch step.
//!
//! Positive controls: with `[fetch] max_manifest_bytes` raised, the same
//! endless manifest takes the apply's RSS above [`MAX_RSS_KIB`] (so the
//! probe can fail and the cap is what keeps it down); without the
//! `[fetch]` pace the trickled object would take minutes (asserted from the
//! object's size, not timed).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::http::{Fault, FileServer};
use common::net::*;
use common::*;

/// The bound on an apply's peak resident set, in KiB (TRUST.md goal
/// table: RSS <= 64 MB).
const MAX_RSS_KIB: u64 = 64 * 1024;
/// Slack on the download cache beyond the compressed size of what v2
/// needs, in bytes (zstd frame bound plus one copy buffer per download).
const CACHE_MARGIN: u64 = 16 << 20;

/// One apply under `/usr/bin/time`, the download cache watched: the
/// outcome, its peak RSS in KiB and the cache's peak size in bytes.
struct Bounded {
    out: Out,
    rss_kib: u64,
    cache_peak: u64,
}

/// `imageupd apply --from URL --id v2 --root ROOT --json` under
/// `/usr/bin/time -f %M`, polling ROOT's download cache size meanwhile.
fn bounded_apply(s: &Scratch, tag: &str, url: &str, root: &Path) -> Bounded {
    let rss_file = s.join(format!("{tag}.rss"));
    let cache = root.join("var/lib/imageupd/cache");
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(dir_bytes(&cache), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let out = Run::new("/usr/bin/time")
        .arg("-o")
        .arg(&rss_file)
        .args(["-f", "%M", bin()])
        .args(["apply", "--from", url, "--id", "v2", "--root"])
        .arg(root)
        .arg("--json")
        .timeout(Duration::from_secs(240))
        .run();
    stop.store(true, Ordering::SeqCst);
    watcher.join().expect("cache watcher");
    let rss = std::fs::read_to_string(&rss_file).expect("time -o output");
    let rss_kib = rss
        .lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no RSS figure in {rss:?}"));
    Bounded {
        out,
        rss_kib,
        cache_peak: peak.load(Ordering::SeqCst),
    }
}

/// Bytes of the regular files below DIR (0 when it does not exist).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Stored bytes of the objects image v2 needs and v1 lacks in STORE.
fn new_object_bytes(store: &Path) -> u64 {
    let old = digests(store, "v1");
    digests(store, "v2")
        .difference(&old)
        .map(|d| std::fs::metadata(object_path(store, d)).map_or(0, |m| m.len()))
        .sum()
}

/// Which store an endless-body case is served from.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Loose objects, whole manifests (no packs, frames or deltas).
    Loose,
    /// Packs and manifest frames, no deltas.
    Packed,
    /// Everything, update deltas included.
    Full,
}

fn layout_store(s: &Scratch, l: Layout) -> PathBuf {
    let dst = s.join(format!("store-{l:?}"));
    if !dst.exists() {
        match l {
            Layout::Loose => store_copy(&dst),
            Layout::Packed => shared_store_without_deltas(&dst),
            Layout::Full => {
                let store = shared_store();
                store.image("v1");
                store.image("v2");
                cmd(
                    "cp",
                    [
                        std::ffi::OsStr::new("-al"),
                        store.dir.as_os_str(),
                        dst.as_os_str(),
                    ],
                );
                dst.clone()
            }
        };
    }
    dst
}

/// An endless-body case: which requests get it, and what must follow.
struct Case {
    what: &'static str,
    layout: Layout,
    rule: fn(&str, u32) -> Fault,
    /// The path prefix or suffix that proves the hostile request was sent.
    hit: fn(&str) -> bool,
    /// How many such requests at least (the payload case needs a second).
    min_hits: u32,
    /// Refused (exit 4, root unchanged), or dropped for another way (v2).
    refused: bool,
}

fn endless_if(cond: bool) -> Fault {
    if cond {
        Fault::Endless
    } else {
        Fault::None
    }
}

fn is_marker(p: &str) -> bool {
    p == "/imageupd-store.json"
}
fn is_manifest(p: &str) -> bool {
    p == "/images/v2/manifest.json.zst"
}
fn is_sig(p: &str) -> bool {
    p == "/images/v2/manifest.json.zst.sig"
}
fn is_frames(p: &str) -> bool {
    p == "/images/v2/manifest.frames.json"
}
fn is_pack_index(p: &str) -> bool {
    p == "/images/v2/packs.idx.zst"
}
fn is_pack(p: &str) -> bool {
    p.starts_with("/packs/")
}
fn is_delta(p: &str) -> bool {
    p.starts_with("/images/v2/deltas/")
}
fn is_object(p: &str) -> bool {
    p.starts_with("/objects/")
}

const CASES: &[Case] = &[
    Case {
        what: "store marker",
        layout: Layout::Loose,
        rule: |p, _| endless_if(is_marker(p)),
        hit: is_marker,
        min_hits: 1,
        refused: true,
    },
    Case {
        what: "whole manifest",
        layout: Layout::Loose,
        rule: |p, _| endless_if(is_manifest(p)),
        hit: is_manifest,
        min_hits: 1,
        refused: true,
    },
    Case {
        what: "manifest signature",
        layout: Layout::Loose,
        rule: |p, _| endless_if(is_sig(p)),
        hit: is_sig,
        min_hits: 1,
        refused: true,
    },
    Case {
        what: "loose object",
        layout: Layout::Loose,
        rule: |p, _| endless_if(is_object(p)),
        hit: is_object,
        min_hits: 1,
        refused: true,
    },
    Case {
        what: "pack index",
        layout: Layout::Packed,
        rule: |p, _| endless_if(is_pack_index(p)),
        hit: is_pack_index,
        min_hits: 1,
        refused: true,
    },
    Case {
        what: "pack range",
        layout: Layout::Packed,
        rule: |p, _| endless_if(is_pack(p)),
        hit: is_pack,
        min_hits: 1,
        refused: true,
    },
    Case {
        what: "manifest frame list",
        layout: Layout::Packed,
        rule: |p, _| endless_if(is_frames(p)),
        hit: is_frames,
        min_hits: 1,
        refused: false,
    },
    Case {
        // The first request for the manifest is a range of its frames.
        what: "manifest frame range",
        layout: Layout::Packed,
        rule: |p, n| endless_if(is_manifest(p) && n == 1),
        hit: is_manifest,
        min_hits: 1,
        refused: false,
    },
    Case {
        what: "update delta (head)",
        layout: Layout::Full,
        rule: |p, n| endless_if(is_delta(p) && n == 1),
        hit: is_delta,
        min_hits: 1,
        refused: false,
    },
    Case {
        what: "update delta (payload)",
        layout: Layout::Full,
        rule: |p, n| endless_if(is_delta(p) && n >= 2),
        hit: is_delta,
        min_hits: 2,
        refused: false,
    },
];

/// Check one bounded run of CASE.
#[track_caller]
fn check_case(c: &Case, b: &Bounded, srv: &FileServer, cache_bound: u64) {
    let ctx = format!("endless {}", c.what);
    let hits: u32 = srv
        .requests()
        .iter()
        .filter(|(p, _)| (c.hit)(p))
        .map(|(_, n)| *n)
        .sum();
    assert!(
        hits >= c.min_hits,
        "{ctx}: the hostile request was never sent: {:?}",
        srv.requests()
    );
    assert!(
        b.rss_kib <= MAX_RSS_KIB,
        "{ctx}: peak RSS {} KiB > {MAX_RSS_KIB} KiB\n{}",
        b.rss_kib,
        b.out.describe()
    );
    assert!(
        b.cache_peak <= cache_bound,
        "{ctx}: the download cache reached {} bytes (> {cache_bound})",
        b.cache_peak
    );
    assert!(
        !b.out.timed_out,
        "{ctx}: the apply hung\n{}",
        b.out.describe()
    );
    if c.refused {
        assert_eq!(
            b.out.code(),
            Some(EXIT_UNTRUSTED),
            "{ctx}: expected a refusal (exit 4)\n{}",
            b.out.describe()
        );
        assert!(
            b.out.stderr.contains("refused") && b.out.stderr.contains("bytes"),
            "{ctx}: the error does not say what was refused\n{}",
            b.out.describe()
        );
    } else {
        assert_eq!(
            b.out.code(),
            Some(EXIT_OK),
            "{ctx}: the agent should have dropped it and gone another way\n{}",
            b.out.describe()
        );
    }
}

#[test]
fn endless_bodies_are_refused_on_every_kind_of_request() {
    let s = scratch("bounds-endless");
    let v2 = shared_store().image("v2");
    // One root for the refusals: a refused apply leaves it at v1 exactly.
    let root = s.join("root");
    node_at_v1(&root);
    let before = snapshot_root(&root);
    let mut table = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let store = layout_store(&s, c.layout);
        let bound = new_object_bytes(&store) + CACHE_MARGIN;
        let root = if c.refused {
            root.clone()
        } else {
            let r = s.join(format!("root-{i}"));
            node_at_v1(&r);
            r
        };
        let srv = FileServer::over(&store).ranges().fault(c.rule).start();
        let b = bounded_apply(&s, &format!("case{i}"), &srv.url, &root);
        check_case(c, &b, &srv, bound);
        if c.refused {
            assert_unchanged(&root, &before, &format!("endless {}", c.what));
        } else {
            assert_applied(&v2, &root, "v2", &format!("endless {}", c.what));
        }
        table.push(format!(
            "{:<24} exit {:?}  rss {:>6} KiB  cache peak {:>9} B  {:.1} s",
            c.what,
            b.out.code(),
            b.rss_kib,
            b.cache_peak,
            b.out.elapsed.as_secs_f64()
        ));
    }
    eprintln!("endless bodies:\n{}", table.join("\n"));
}

#[test]
fn the_manifest_cap_is_what_bounds_memory() {
    // Positive control of the test above: the same endless manifest with
    // the cap raised to 256 MiB takes the RSS well past the bound (and is
    // still refused, at the higher cap).
    let s = scratch("bounds-control");
    let root = s.join("root");
    node_at_v1(&root);
    write_config(&root, "[fetch]\nmax_manifest_bytes = 268435456\n");
    let store = layout_store(&s, Layout::Loose);
    let srv = FileServer::over(&store)
        .ranges()
        .fault(|p, _| endless_if(is_manifest(p)))
        .start();
    let b = bounded_apply(&s, "control", &srv.url, &root);
    assert_eq!(b.out.code(), Some(EXIT_UNTRUSTED), "{}", b.out.describe());
    assert!(
        b.rss_kib > MAX_RSS_KIB,
        "with the cap raised the RSS stayed at {} KiB: the probe cannot fail",
        b.rss_kib
    );
    assert!(
        b.out.stderr.contains("268435456"),
        "refused at the raised cap\n{}",
        b.out.describe()
    );
}

/// A zstd frame of RLE blocks: `blocks` × 128 KiB of zeros in 4 bytes per
/// block (no content size in the header, as a streaming encoder writes).
fn zstd_bomb(blocks: usize) -> Vec<u8> {
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd];
    // Frame header descriptor: no checksum, no content size, no dictionary,
    // not single-segment; then the window descriptor (128 KiB window).
    f.extend_from_slice(&[0x00, 0x38]);
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        // Block header: last flag, type 1 (RLE), size 128 KiB.
        let h = last | (1 << 1) | ((128 * 1024) << 3);
        f.extend_from_slice(&h.to_le_bytes()[..3]);
        f.push(0);
    }
    f
}

#[test]
fn zstd_bombs_are_refused_at_the_declared_size() {
    let s = scratch("bounds-bomb");
    // The object: v2's largest new object replaced by 4 GiB of zeros in
    // 128 KiB of zstd (it fits the body cap of the declared size).
    let store = layout_store(&s, Layout::Loose);
    let (big, big_len) = largest_new_object(&store, "v1", "v2");
    let bomb = zstd_bomb(32 * 1024);
    assert!((bomb.len() as u64) < big_len + (128 << 10));
    let p = object_path(&store, &big);
    std::fs::remove_file(&p).expect("unlink the hard-linked object");
    std::fs::write(&p, &bomb).expect("write the bomb");
    let root = s.join("root");
    node_at_v1(&root);
    let before = snapshot_root(&root);
    let srv = FileServer::over(&store).ranges().start();
    let b = bounded_apply(&s, "object", &srv.url, &root);
    assert_eq!(b.out.code(), Some(EXIT_UNTRUSTED), "{}", b.out.describe());
    assert!(
        b.out.stderr.contains("bytes declared"),
        "refused by the decompression cap, not by the digest after 4 GiB\n{}",
        b.out.describe()
    );
    assert!(
        b.rss_kib <= MAX_RSS_KIB,
        "object bomb: RSS {} KiB",
        b.rss_kib
    );
    assert!(b.cache_peak <= new_object_bytes(&store) + CACHE_MARGIN);
    assert_unchanged(&root, &before, "zstd bomb object");

    // The manifest: a bomb signed with the store's own key (a publisher
    // gone wrong), so the signature passes and only the cap stops it.
    let mstore = layout_store(&s, Layout::Full);
    let m = mstore.join("images/v2/manifest.json.zst");
    std::fs::remove_file(&m).expect("unlink manifest");
    std::fs::write(&m, zstd_bomb(32 * 1024)).expect("write manifest bomb");
    let sig = mstore.join("images/v2/manifest.json.zst.sig");
    std::fs::remove_file(&sig).expect("unlink signature");
    imageupd::format::sign::sign_file(&shared_store().key.secret, &m).expect("sign the bomb");
    for f in ["manifest.frames.json", "packs.idx.zst", "packs.idx.zst.sig"] {
        let f = mstore.join("images/v2").join(f);
        if f.exists() {
            std::fs::remove_file(&f).expect("unlink");
        }
    }
    hide_deltas(&mstore);
    let srv = FileServer::over(&mstore).ranges().start();
    let b = bounded_apply(&s, "manifest", &srv.url, &root);
    assert_eq!(b.out.code(), Some(EXIT_UNTRUSTED), "{}", b.out.describe());
    assert!(
        b.out.stderr.contains("decompresses to more than"),
        "{}",
        b.out.describe()
    );
    assert!(
        b.rss_kib <= MAX_RSS_KIB,
        "manifest bomb: RSS {} KiB",
        b.rss_kib
    );
    assert_unchanged(&root, &before, "zstd bomb manifest");
}

/// Trickle the first request for the largest new object of v2.
fn trickle_big(store: &Path) -> FileServer {
    let (big, _) = largest_new_object(store, "v1", "v2");
    let path = format!("/objects/{}/{big}", &big[..2]);
    assert_eq!(BIG.get_or_init(|| path.clone()), &path);
    FileServer::over(store)
        .ranges()
        .fault(|p, n| {
            if BIG.get().is_some_and(|b| b == p) && n == 1 {
                Fault::Trickle
            } else {
                Fault::None
            }
        })
        .start()
}

/// The trickled object's path (fault rules are plain functions).
static BIG: std::sync::OnceLock<String> = std::sync::OnceLock::new();

#[test]
fn a_trickling_server_is_aborted_retried_and_leaves_quiesce_alone() {
    let s = scratch("bounds-trickle");
    let v2 = shared_store().image("v2");
    let store = layout_store(&s, Layout::Loose);
    let (_, big_len) = largest_new_object(&store, "v1", "v2");
    // Without the pace the trickle would take big_len seconds (minutes).
    assert!(big_len > 300, "object of {big_len} bytes");

    // A normal run: the quiesce window to compare with.
    let root = s.join("normal");
    node_at_v1(&root);
    let srv = FileServer::over(&store).ranges().start();
    let normal = apply_url(&srv.url, &root, &[]).expect_ok();
    let q_normal = normal.json()["quiesce_ms"].as_u64().expect("quiesce_ms");

    let mut rows = Vec::new();
    for (tag, cfg, cause) in [
        (
            "low-speed",
            "[fetch]\nlow_speed_bytes = 1024\nlow_speed_secs = 3\n",
            "arrived in 3 s",
        ),
        (
            "deadline",
            "[fetch]\nlow_speed_bytes = 0\ndeadline_secs = 4\n",
            "deadline of 4 s",
        ),
    ] {
        let root = s.join(tag);
        node_at_v1(&root);
        write_config(&root, cfg);
        let srv = trickle_big(&store);
        let out = apply_url(&srv.url, &root, &[]).expect_ok();
        let j = out.json();
        let big = BIG.get().expect("trickled path");
        assert_eq!(
            srv.requests().get(big.as_str()),
            Some(&2),
            "{tag}: the trickled object is asked for twice (aborted, retried)"
        );
        assert!(
            out.stderr.contains(cause),
            "{tag}: the abort does not name its cause {cause:?}\n{}",
            out.describe()
        );
        assert!(
            j["download"]["retries"].as_u64().unwrap_or(0) >= 1,
            "{tag}: {j}"
        );
        let q = j["quiesce_ms"].as_u64().expect("quiesce_ms");
        let fetch = j["phases"]["fetch"].as_u64().unwrap_or(0);
        // The stall cost fetch time (seconds), and none of it fell inside
        // the quiesce window: that stays within noise of the normal run's.
        assert!(
            fetch >= 2000,
            "{tag}: the stall did not happen in the fetch step: {j}"
        );
        assert!(
            q <= 2 * q_normal + 500,
            "{tag}: quiesce {q} ms against {q_normal} ms in a normal run"
        );
        assert_applied(&v2, &root, "v2", &format!("trickle ({tag})"));
        rows.push(format!(
            "{tag}: fetch {fetch} ms, quiesce {q} ms (normal {q_normal} ms)"
        ));
    }
    eprintln!("trickle:\n{}", rows.join("\n"));
}
