//! Network tests: `imageupd serve` and HTTP(S) sources (SPEC §2, §5.3, §9).
//!
//! - v1 → v2 from `imageupd serve` on loopback, and from a stock nginx
//!   serving the same store directory, checked by the rsync and metadata
//!   oracles and `verify --checksum`;
//! - a missing object (404) fails cleanly (exit 9), an altered object is
//!   refused (exit 4), the root untouched both times;
//! - path escapes (`..`, `%2e%2e`, `%2f`, NUL, symlinks inside the store
//!   pointing out) never yield file content; HEAD, Range and Cache-Control;
//! - HTTPS with a test CA made by openssl, and a wrong CA refused.
//!
//! Requests for the escape checks are written by hand over TCP, so no
//! client normalises the paths first.
//!
//! Interrupted transfers, retries and a server without Range are in
//! tests/net_faults.rs.

mod common;

use std::ffi::OsStr;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::{raw, Nginx};
use common::net::*;
use common::serve::Server;
use common::*;

// ---------------------------------------------------------------------------
// Tests.

#[test]
fn apply_v1_to_v2_from_imageupd_serve() {
    let store = shared_store();
    let v1 = store.image("v1");
    let v2 = store.image("v2");
    let s = scratch("net-serve");
    let root = s.join("root");
    make_root(&v1, &root, &store.key);
    let mut srv = Server::start(&store.dir, "127.0.0.1:0", &[], &s.join("serve.log"));

    let before = snapshot_root(&root);
    let plan = imageupd(["plan", "--from", &srv.url, "--id", "v2", "--root"])
        .arg(&root)
        .arg("--json")
        .ok();
    assert!(
        plan.json()["plan"]["fetch_objects"].as_u64().unwrap_or(0) > 0,
        "plan fetches nothing?\n{}",
        plan.describe()
    );
    assert_unchanged(&root, &before, "plan from a URL");

    let out = apply_url(&srv.url, &root, &[]).expect_ok();
    eprintln!("apply v1 -> v2 over HTTP: {:.2?}", out.elapsed);
    let d = download_report(&out);
    let want = out.json()["plan"]["fetch_objects"]
        .as_u64()
        .expect("fetch_objects");
    assert_eq!(
        d["objects"].as_u64(),
        Some(want),
        "every planned object downloaded once\n{}",
        out.describe()
    );
    // The shared store has packs: a few range requests, not one per object
    // (a solid block of which only a sliver is wanted sends that sliver
    // loose instead: at most a few objects).
    let packed = d["packed_objects"].as_u64().unwrap_or(0);
    assert!(
        packed <= want && packed * 50 >= want * 49,
        "nearly every planned object came from a pack ({packed} of {want})\n{}",
        out.describe()
    );
    assert!(
        d["bytes"].as_u64().unwrap_or(0) > 0 && d["requests"].as_u64().unwrap_or(0) <= 30,
        "{}",
        out.describe()
    );
    assert_eq!(
        d["retries"].as_u64(),
        Some(0),
        "no retries against a healthy server\n{}",
        out.describe()
    );
    assert_applied(&v2, &root, "v2", "apply v1 -> v2 from imageupd serve");
    assert_no_cache(&root);
    assert!(
        srv.log().contains("\"GET /packs/"),
        "no access log lines:\n{}",
        clip(&srv.log(), 20)
    );

    // Same URL again: nothing to do, no object requested.
    let again = apply_url(&srv.url, &root, &[]).expect_ok();
    assert_eq!(
        again.json()["result"].as_str(),
        Some("nothing-to-do"),
        "{}",
        again.describe()
    );

    let st = srv.term();
    assert_eq!(st.code(), Some(0), "serve must exit 0 on SIGTERM ({st})");
}

#[test]
fn apply_v1_to_v2_from_nginx() {
    let store = shared_store();
    let v1 = store.image("v1");
    let v2 = store.image("v2");
    let s = scratch("net-nginx");
    let root = s.join("root");
    make_root(&v1, &root, &store.key);
    let nginx = Nginx::start(&store.dir, &s.join("nginx"));
    let out = apply_url(&nginx.url, &root, &[]);
    assert_eq!(
        out.code(),
        Some(EXIT_OK),
        "apply from nginx failed\n{}\n{}",
        out.describe(),
        nginx.logs()
    );
    download_report(&out);
    assert_applied(&v2, &root, "v2", "apply v1 -> v2 from nginx");
    assert_no_cache(&root);
}

#[test]
fn missing_object_fails_cleanly() {
    let s = scratch("net-404");
    let store = store_copy(&s.join("store"));
    let root = s.join("root");
    node_at_v1(&root);
    let (big, _) = largest_new_object(&store, "v1", "v2");
    std::fs::remove_file(object_path(&store, &big)).expect("remove object");
    let srv = Server::start(&store, "127.0.0.1:0", &[], &s.join("serve.log"));
    let before = snapshot_root(&root);
    let t0 = Instant::now();
    let out = apply_url(&srv.url, &root, &[]).expect_code(EXIT_SOURCE);
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "a 404 must not be retried for long ({:.1?})",
        t0.elapsed()
    );
    let err = out.all_output();
    let obj_url = format!("{}objects/{}/{big}", srv.url, &big[..2]);
    assert!(
        err.contains(&big) && err.contains(&obj_url) && err.contains("404"),
        "the error must name the object, its URL and the 404\n{}",
        out.describe()
    );
    assert!(
        err.contains("was not changed"),
        "the error must say the root is untouched\n{}",
        out.describe()
    );
    assert_unchanged(&root, &before, "404 of an object");
    assert_eq!(
        srv.log().matches(&format!("/{big}\"")).count(),
        1,
        "a 404 must not be retried:\n{}",
        clip(&srv.log(), 20)
    );

    // Once the publisher has the object again, the next run reuses what the
    // failed run downloaded and converges.
    std::fs::hard_link(
        object_path(&shared_store().dir, &big),
        object_path(&store, &big),
    )
    .expect("restore object");
    let out = apply_url(&srv.url, &root, &[]).expect_ok();
    let d = download_report(&out);
    let want = out.json()["plan"]["fetch_objects"]
        .as_u64()
        .expect("fetch_objects");
    assert!(
        d["cached_objects"].as_u64().unwrap_or(0) > 0,
        "nothing reused from the failed run's downloads: {d}"
    );
    assert_eq!(
        d["cached_objects"].as_u64().unwrap_or(0) + d["objects"].as_u64().unwrap_or(0),
        want,
        "{d}"
    );
    assert_applied(
        &fixture_tree("v2"),
        &root,
        "v2",
        "apply v1 -> v2 after a 404 was fixed",
    );
    assert_no_cache(&root);
}

#[test]
fn altered_object_is_refused() {
    let s = scratch("net-altered");
    let store = store_copy(&s.join("store"));
    let root = s.join("root");
    node_at_v1(&root);
    let (big, _) = largest_new_object(&store, "v1", "v2");
    let p = object_path(&store, &big);
    // Replace (not rewrite: the copy shares inodes with the shared store).
    std::fs::remove_file(&p).expect("remove object");
    std::fs::write(
        &p,
        zstd::encode_all(&b"#!/bin/sh\necho owned\n"[..], 3).expect("zstd"),
    )
    .expect("write altered object");
    let srv = Server::start(&store, "127.0.0.1:0", &[], &s.join("serve.log"));
    let before = snapshot_root(&root);
    let out = apply_url(&srv.url, &root, &[]).expect_code(EXIT_UNTRUSTED);
    assert!(
        out.all_output().contains(&big),
        "the error must name the object\n{}",
        out.describe()
    );
    assert_unchanged(&root, &before, "altered object");
    let cached = root
        .join("var/lib/imageupd/cache/objects")
        .join(&big[..2])
        .join(&big);
    assert!(
        !cached.exists(),
        "an object that failed verification is in the cache"
    );
}

#[test]
fn serve_confines_paths_and_speaks_http_properly() {
    let s = scratch("net-paths");
    let store = s.join("store");
    let secret = "TOPSECRET-5f1c2d";
    std::fs::write(s.join("secret.txt"), secret).expect("secret");
    std::fs::create_dir_all(store.join("objects/ab")).expect("objects");
    std::fs::create_dir_all(store.join("images")).expect("images");
    std::fs::create_dir_all(store.join("disks")).expect("disks");
    std::fs::write(store.join("imageupd-store.json"), "{\"format\":1}").expect("marker");
    std::fs::write(store.join("index.json"), "{\"format\":1,\"images\":[]}").expect("index");
    let content: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(store.join("objects/ab/abcdef"), &content).expect("object");
    std::fs::write(store.join("disks/SHA256SUMS"), "0000  img.raw\n").expect("sums");
    std::os::unix::fs::symlink("../../../secret.txt", store.join("objects/ab/rel-link"))
        .expect("symlink");
    std::os::unix::fs::symlink(s.join("secret.txt"), store.join("objects/ab/abs-link"))
        .expect("symlink");
    std::os::unix::fs::symlink(s.path(), store.join("images/dir-link")).expect("symlink");
    std::os::unix::fs::symlink(s.path(), store.join("disks/up")).expect("symlink");
    let mut srv = Server::start(&store, "127.0.0.1:0", &[], &s.join("serve.log"));
    let a = srv.addr;

    // A positive control, so the refusals below mean something.
    let r = raw(a, "GET", "/objects/ab/abcdef", &[]);
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, content.as_slice()),
        "plain GET"
    );
    assert_eq!(r.header("content-length"), Some("10000"));
    assert_eq!(
        r.header("cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    let r = raw(a, "GET", "/index.json", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("cache-control"),
        Some("no-cache"),
        "index.json must be revalidated"
    );
    let r = raw(a, "GET", "/disks/SHA256SUMS", &[]);
    assert_eq!(
        (r.status, r.body.as_slice()),
        (200, &b"0000  img.raw\n"[..]),
        "disks/ is served"
    );
    let r = raw(a, "GET", "/objects/%61b/abcdef", &[]);
    assert_eq!(
        r.status, 200,
        "percent-encoded ordinary characters are fine"
    );

    for target in [
        "/../secret.txt",
        "/objects/../../secret.txt",
        "/objects/ab/../../../secret.txt",
        "/%2e%2e/secret.txt",
        "/objects/%2e%2e/%2e%2e/secret.txt",
        "/objects/%2E%2E/%2E%2E/secret.txt",
        "/objects%2f..%2f..%2fsecret.txt",
        "/objects/ab%2f..%2f..%2f..%2fsecret.txt",
        "/objects/ab/rel-link",
        "/objects/ab/abs-link",
        "/images/dir-link/secret.txt",
        "/disks/up/secret.txt",
        "/objects/ab/abcdef%00",
        "/objects/ab/%00",
        "//etc/passwd",
        "/etc/passwd",
        &format!("{}", s.join("secret.txt").display()),
        "/objects/ab\\..\\..\\secret.txt",
        "/tmp/x",
    ] {
        let r = raw(a, "GET", target, &[]);
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            r.status == 400 || r.status == 404,
            "GET {target} answered {} (want 400/404)",
            r.status
        );
        assert!(
            !body.contains(secret) && !body.contains("root:"),
            "GET {target} leaked file content: {body}"
        );
    }

    // HEAD: Content-Length and Last-Modified, no body.
    let r = raw(a, "HEAD", "/objects/ab/abcdef", &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some("10000"),
        "HEAD needs Content-Length"
    );
    let lm = r.header("last-modified").expect("HEAD needs Last-Modified");
    assert!(
        lm.ends_with(" GMT") && lm.len() == 29,
        "Last-Modified is an HTTP date: {lm}"
    );
    assert!(r.body.is_empty(), "HEAD has no body");

    // Ranges.
    let r = raw(a, "GET", "/objects/ab/abcdef", &["Range: bytes=100-199"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/10000"));
    assert_eq!(r.body, &content[100..200]);
    let r = raw(a, "GET", "/objects/ab/abcdef", &["Range: bytes=9990-"]);
    assert_eq!((r.status, r.body.as_slice()), (206, &content[9990..]));
    let r = raw(a, "GET", "/objects/ab/abcdef", &["Range: bytes=-5"]);
    assert_eq!((r.status, r.body.as_slice()), (206, &content[9995..]));
    let r = raw(a, "GET", "/objects/ab/abcdef", &["Range: bytes=10000-"]);
    assert_eq!(r.status, 416, "a range past the end is unsatisfiable");
    assert_eq!(r.header("content-range"), Some("bytes */10000"));
    let r = raw(a, "POST", "/objects/ab/abcdef", &["Content-Length: 0"]);
    assert_eq!(r.status, 405);

    let st = srv.term();
    assert_eq!(st.code(), Some(0), "serve must exit 0 on SIGTERM ({st})");

    // Graceful: a response in flight when SIGTERM arrives is finished.
    let big: Vec<u8> = (0..600_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(store.join("objects/ab/big"), &big).expect("big object");
    let mut slow = Server::throttled(&store, &s.join("slow.log"));
    let a = slow.addr;
    let t = std::thread::spawn(move || raw(a, "GET", "/objects/ab/big", &[]));
    let t0 = Instant::now();
    while !slow.log().contains("GET /objects/ab/big") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the slow GET never arrived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = slow.term();
    assert_eq!(st.code(), Some(0), "serve must exit 0 on SIGTERM ({st})");
    let r = t.join().expect("slow GET");
    assert_eq!(r.status, 200);
    assert!(
        r.body == big,
        "the response in flight at SIGTERM was cut ({} of {} bytes)",
        r.body.len(),
        big.len()
    );
    assert!(
        TcpStream::connect(a).is_err(),
        "still accepting connections after SIGTERM"
    );
}

/// A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA.
struct Pki {
    ca: PathBuf,
    wrong_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).expect("pki dir");
    let d = dir.display();
    sh(&format!(
        "cd {d}
        ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
        openssl req -x509 $ec -keyout ca.key -out ca.pem -days 2 -subj /CN=imageupd-test-ca 2>&1
        openssl req -x509 $ec -keyout wrong.key -out wrong.pem -days 2 -subj /CN=imageupd-test-ca 2>&1
        openssl req $ec -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>&1
        printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext.cnf
        openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf 2>&1"
    ));
    Pki {
        ca: dir.join("ca.pem"),
        wrong_ca: dir.join("wrong.pem"),
        cert: dir.join("srv.pem"),
        key: dir.join("srv.key"),
    }
}

#[test]
fn https_with_a_test_ca_and_wrong_ca_refused() {
    let store = shared_store();
    let v1 = store.image("v1");
    let v2 = store.image("v2");
    let s = scratch("net-tls");
    let pki = make_pki(&s.join("pki"));
    let srv = Server::start(
        &store.dir,
        "127.0.0.1:0",
        &[
            OsStr::new("--tls-cert"),
            pki.cert.as_os_str(),
            OsStr::new("--tls-key"),
            pki.key.as_os_str(),
        ],
        &s.join("serve.log"),
    );
    assert!(srv.url.starts_with("https://"), "{}", srv.url);
    let root = s.join("root");
    make_root(&v1, &root, &store.key);
    let before = snapshot_root(&root);

    // A certificate from an unknown CA is refused, at once and for good.
    for extra in [
        vec![],
        vec![OsStr::new("--ca-file"), pki.wrong_ca.as_os_str()],
    ] {
        let t0 = Instant::now();
        let out = imageupd(["apply", "--from", &srv.url, "--id", "v2", "--root"])
            .arg(&root)
            .arg("--json")
            .args(&extra)
            .code(EXIT_SOURCE);
        assert!(
            out.all_output().to_lowercase().contains("certificate"),
            "the error must be about the certificate\n{}",
            out.describe()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "a certificate failure must not be retried ({:.1?})",
            t0.elapsed()
        );
    }
    assert_unchanged(&root, &before, "wrong CA");

    // The CA named in the node's config (a path on the node) is trusted.
    std::fs::copy(&pki.ca, root.join("etc/imageupd/test-ca.pem")).expect("copy CA");
    write_config(&root, "ca_file = \"/etc/imageupd/test-ca.pem\"\n");
    imageupd(["plan", "--from", &srv.url, "--id", "v2", "--root"])
        .arg(&root)
        .arg("--json")
        .ok();
    std::fs::remove_file(root.join("etc/imageupd/config.toml")).expect("rm config");

    // And --ca-file; a full apply over HTTPS.
    let out = apply_url(
        &srv.url,
        &root,
        &["--ca-file", pki.ca.to_str().expect("utf-8 path")],
    )
    .expect_ok();
    download_report(&out);
    assert_applied(&v2, &root, "v2", "apply v1 -> v2 over HTTPS");
}
