//! Network faults: the publisher SIGKILLed while an object is half sent
//! and restarted, the apply SIGKILLed mid-download and run again (both
//! resume with a Range request and converge), transient statuses
//! (503/429/408) retried, and a server that ignores Range.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::FileServer;
use common::net::*;
use common::serve::Server;
use common::*;

#[test]
fn publisher_killed_and_restarted_mid_transfer() {
    let MidTransfer {
        s,
        store,
        root,
        big,
        big_len,
        mut srv,
        port,
        apply,
    } = mid_transfer("net-restart");
    srv.kill();
    let part_len = half_downloaded(&root, &big, big_len);
    // Down for a while (the apply backs off and retries), then back on the
    // same port, unthrottled.
    std::thread::sleep(Duration::from_millis(1500));
    let srv2 = Server::start(
        &store,
        &format!("127.0.0.1:{port}"),
        &[],
        &s.join("serve2.log"),
    );
    let (status, stdout, stderr) = apply.wait();
    assert_eq!(
        status.code(),
        Some(EXIT_OK),
        "apply across a publisher restart failed\nstdout:\n{stdout}\nstderr:\n{}",
        clip(&stderr, 60)
    );
    let j: serde_json::Value = serde_json::from_str(stdout.trim()).expect("apply --json");
    let d = &j["download"];
    assert!(
        d["retries"].as_u64().unwrap_or(0) >= 1,
        "no retries counted: {d}"
    );
    assert!(
        d["resumed"].as_u64().unwrap_or(0) >= 1,
        "the half-sent object was not resumed: {d}"
    );
    assert_range_request(&srv2, &big, part_len);
    assert_applied(
        &fixture_tree("v2"),
        &root,
        "v2",
        "apply v1 -> v2 across a publisher restart",
    );
    assert_no_cache(&root);
}

#[test]
fn apply_killed_mid_download_resumes_in_the_next_run() {
    let MidTransfer {
        s,
        store,
        root,
        big,
        big_len,
        mut srv,
        port,
        mut apply,
    } = mid_transfer("net-client-kill");
    apply.child.kill().expect("SIGKILL apply");
    let (status, _, _) = apply.wait();
    assert_eq!(
        status.signal(),
        Some(9),
        "apply should have died of SIGKILL ({status})"
    );
    let part_len = half_downloaded(&root, &big, big_len);
    srv.kill();
    let srv2 = Server::start(
        &store,
        &format!("127.0.0.1:{port}"),
        &[],
        &s.join("serve2.log"),
    );
    // No --from/--id: the journal names the interrupted target and its URL.
    let out = imageupd(["apply", "--root"]).arg(&root).arg("--json").ok();
    let j = out.json();
    assert_eq!(j["resumed"].as_bool(), Some(true), "{}", out.describe());
    let d = download_report(&out);
    assert!(
        d["resumed"].as_u64().unwrap_or(0) >= 1,
        "the partial download was not resumed: {d}"
    );
    assert!(
        d["cached_objects"].as_u64().unwrap_or(0) >= 1,
        "nothing reused from the killed run: {d}"
    );
    assert_range_request(&srv2, &big, part_len);
    assert_applied(
        &fixture_tree("v2"),
        &root,
        "v2",
        "apply v1 -> v2 resumed after kill -9",
    );
    assert_no_cache(&root);
}

/// An apply v1 → v2 (in the background) from a throttled `imageupd serve`
/// over a store copy, caught while the largest new object is half sent.
struct MidTransfer {
    s: Scratch,
    store: PathBuf,
    root: PathBuf,
    /// The largest new object, and its stored length.
    big: String,
    big_len: u64,
    srv: Server,
    /// The server's port (a restarted server listens on it again).
    port: u16,
    apply: Bg,
}

/// [`MidTransfer`] in a scratch directory named NAME.
#[track_caller]
fn mid_transfer(name: &str) -> MidTransfer {
    let s = scratch(name);
    let store = store_copy(&s.join("store"));
    let root = s.join("root");
    make_root(&fixture_tree("v1"), &root, &shared_store().key);
    let (big, big_len) = largest_new_object(&store, "v1", "v2");
    let srv = Server::throttled(&store, &s.join("serve1.log"));
    let port = srv.addr.port();
    let mut apply = Bg::spawn(
        imageupd(["apply", "--from", &srv.url, "--id", "v2", "--root"])
            .arg(&root)
            .arg("--json"),
    );
    wait_until_sending(&srv, &big, &mut apply);
    MidTransfer {
        s,
        store,
        root,
        big,
        big_len,
        srv,
        port,
        apply,
    }
}

/// Wait until SRV has started sending object BIG, then a little more.
#[track_caller]
fn wait_until_sending(srv: &Server, big: &str, apply: &mut Bg) {
    let needle = format!("GET /objects/{}/{big}\" 200", &big[..2]);
    let t0 = Instant::now();
    while !srv.log().contains(&needle) {
        if let Ok(Some(st)) = apply.child.try_wait() {
            panic!(
                "apply ended ({st}) before object {big} was requested; log:\n{}",
                clip(&srv.log(), 40)
            );
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "object {big} never requested; log:\n{}",
            clip(&srv.log(), 40)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(400));
}

/// The partial download of BIG in ROOT's cache: its length, asserted to be
/// strictly between 0 and the whole object.
#[track_caller]
fn half_downloaded(root: &Path, big: &str, big_len: u64) -> u64 {
    // The first frame is 256 KiB; the object must be larger to be cut.
    assert!(
        big_len > 300 * 1024,
        "fixture v2 has no object larger than 300 KiB to interrupt ({big_len} bytes)"
    );
    let part = root.join("var/lib/imageupd/cache/partial").join(big);
    let len = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(
        len > 0 && len < big_len,
        "expected a partial download of {big} ({len} of {big_len} bytes)"
    );
    len
}

/// SRV answered a Range request for BIG from byte FROM on with 206.
#[track_caller]
fn assert_range_request(srv: &Server, big: &str, from: u64) {
    let line = format!("GET /objects/{}/{big}\" 206", &big[..2]);
    assert!(
        srv.log()
            .lines()
            .any(|l| l.contains(&line) && l.contains(&format!("range=bytes={from}-"))),
        "the publisher saw no Range request for bytes {from}- of {big}:\n{}",
        clip(&srv.log(), 40)
    );
}

/// The one HTTP test server over STORE, answering the first request for
/// the marker with 503, for a manifest with 429, and for objects whose name
/// starts with `0` or `1` with 503 or 408; later requests get the file.
fn flaky_server(store: PathBuf) -> FileServer {
    FileServer::over(&store).fail_first(flaky).start()
}

/// The status of the first request for PATH from [`flaky_server`].
fn flaky(path: &str) -> Option<&'static str> {
    let name = path.rsplit('/').next().unwrap_or("");
    match () {
        _ if path == "/imageupd-store.json" => Some("503 Service Unavailable"),
        _ if path.ends_with("/manifest.json.zst") => Some("429 Too Many Requests"),
        _ if path.starts_with("/objects/") && name.starts_with('0') => {
            Some("503 Service Unavailable")
        }
        _ if path.starts_with("/objects/") && name.starts_with('1') => Some("408 Request Timeout"),
        _ => None,
    }
}

#[test]
fn transient_statuses_are_retried() {
    let store = shared_store();
    store.image("v1");
    let v2 = store.image("v2");
    let s = scratch("net-flaky");
    let root = s.join("root");
    node_at_v1(&root);
    // Loose objects (no pack index), so every object is a request of its own.
    let srv = flaky_server(store_copy(&s.join("store")));
    let out = apply_url(&srv.url, &root, &[]).expect_ok();
    let d = download_report(&out);
    let g = srv.requests();
    let flaky: Vec<(&String, &u32)> = g
        .iter()
        .filter(|(p, _)| {
            p.starts_with("/objects/")
                && matches!(
                    p.rsplit('/').next().and_then(|n| n.chars().next()),
                    Some('0' | '1')
                )
        })
        .collect();
    assert!(
        !flaky.is_empty(),
        "no object starting with 0 or 1 was fetched: {g:?}"
    );
    assert!(
        flaky.iter().all(|(_, &n)| n == 2),
        "each flaky object is fetched exactly twice: {flaky:?}"
    );
    // The marker, the manifest, and each flaky object failed once.
    assert_eq!(d["retries"].as_u64(), Some(2 + flaky.len() as u64), "{d}");
    assert_eq!(g.get("/imageupd-store.json"), Some(&2));
    assert_eq!(g.get("/images/v2/manifest.json.zst"), Some(&2));
    assert!(
        g.values().all(|&n| n <= 2),
        "something was asked for more than twice: {g:?}"
    );
    drop(g);
    assert_applied(
        &v2,
        &root,
        "v2",
        "apply v1 -> v2 through 503/429/408 answers",
    );
}

#[test]
fn packs_through_a_server_that_ignores_range() {
    // The flaky server answers every request with the whole file (200),
    // Range or not: pack spans are then read from byte 0 and skipped up to
    // the frames they need; the result is the same.
    let store = shared_store();
    store.image("v1");
    let v2 = store.image("v2");
    let s = scratch("net-norange");
    let root = s.join("root");
    node_at_v1(&root);
    // Without deltas: this is about packs (tests/delta.rs has deltas).
    let srv = flaky_server(shared_store_without_deltas(&s.join("store")));
    let out = apply_url(&srv.url, &root, &[]).expect_ok();
    let d = download_report(&out);
    let g = srv.requests();
    assert!(
        g.keys().any(|p| p.starts_with("/packs/")),
        "no pack was fetched: {g:?}"
    );
    assert!(
        !g.keys().any(|p| p.starts_with("/objects/")),
        "objects were fetched loose although packs cover them: {g:?}"
    );
    assert!(d["packed_objects"].as_u64().unwrap_or(0) > 100, "{d}");
    drop(g);
    assert_applied(
        &v2,
        &root,
        "v2",
        "apply v1 -> v2 through a server without Range",
    );
}
