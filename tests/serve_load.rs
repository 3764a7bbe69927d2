//! `imageupd serve` under load (issue 13): 200 concurrent clients on
//! loopback for a bounded time against the shared store: good clients fetch
//! whole objects and pack ranges in a loop and check every body's length;
//! hostile ones request a pack and then stall (read nothing, or a byte a
//! second) or disconnect mid-body. Required: no 5xx and no failed request
//! among the good clients, the server's peak RSS bounded, and the good
//! clients' throughput with 100 hostile clients beside them at least half of
//! what the same good clients get alone (same run, same machine: a ratio,
//! not a speed).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::serve::Server;
use common::*;

/// Clients in all (the figure).
const CLIENTS: usize = 200;
/// Of which hostile in the loaded phase.
const HOSTILE: usize = 100;
/// Length of each phase.
const PHASE: Duration = Duration::from_secs(8);
/// Bound on the server's peak RSS, in KiB.
const MAX_SERVER_RSS_KIB: u64 = 256 * 1024;

/// Files to fetch: (path, length).
fn targets(store: &Path) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    for sub in ["objects", "packs"] {
        let out = cmd(
            "find",
            [store.join(sub).as_os_str(), "-type".as_ref(), "f".as_ref()],
        );
        for l in out.lines().take(400) {
            let p = Path::new(l);
            let len = std::fs::metadata(p).expect("stat").len();
            let rel = p.strip_prefix(store).expect("below store");
            v.push((format!("/{}", rel.display()), len));
        }
    }
    assert!(v.iter().any(|(p, _)| p.starts_with("/packs/")), "no packs");
    v
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    bytes: AtomicU64,
    failures: AtomicU64,
    server_errors: AtomicU64,
}

/// One GET on a fresh connection; returns (status, body length).
fn get(addr: SocketAddr, path: &str, range: Option<(u64, u64)>) -> std::io::Result<(u16, u64)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some((a, b)) = range {
        req.push_str(&format!("Range: bytes={a}-{b}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
    }
    let n = std::io::copy(&mut r, &mut std::io::sink())?;
    Ok((status, n))
}

/// A good client until STOP: whole files and ranges, lengths checked.
fn good(addr: SocketAddr, files: &[(String, u64)], seed: u64, stop: &AtomicBool, t: &Tally) {
    let mut rng = Rng::new(seed);
    while !stop.load(Ordering::Relaxed) {
        let (p, len) = &files[(rng.next_u64() % files.len() as u64) as usize];
        let range = (p.starts_with("/packs/") && *len > 2).then(|| {
            let a = rng.next_u64() % (*len / 2);
            (a, a + rng.next_u64() % (*len - a))
        });
        let want = range.map_or(*len, |(a, b)| b - a + 1);
        t.requests.fetch_add(1, Ordering::Relaxed);
        match get(addr, p, range) {
            Ok((s, n)) if (s == 200 || s == 206) && n == want => {
                t.bytes.fetch_add(n, Ordering::Relaxed);
            }
            Ok((s, _)) if s >= 500 => {
                t.server_errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                t.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A hostile client until STOP: asks for the largest pack, then (by KIND)
/// reads nothing, reads a byte a second, or reads 1000 bytes and hangs up.
fn hostile(addr: SocketAddr, path: &str, kind: usize, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            continue;
        }
        let mut b = [0u8; 1000];
        match kind % 3 {
            0 => {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            1 => {
                while !stop.load(Ordering::Relaxed) {
                    if !matches!(s.read(&mut b[..1]), Ok(1)) {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            _ => {
                // Hang up mid-body, then come back a little later (not in
                // a tight loop: that would be load, not hostility).
                if s.read_exact(&mut b).is_ok() {
                    drop(s);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Run GOOD good clients (and HOSTILE hostile ones) for [`PHASE`]; the
/// good clients' tally.
fn phase(
    addr: SocketAddr,
    files: &Arc<Vec<(String, u64)>>,
    good_n: usize,
    bad_n: usize,
) -> Arc<Tally> {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let big = files
        .iter()
        .filter(|(p, _)| p.starts_with("/packs/"))
        .max_by_key(|(_, l)| *l)
        .expect("a pack")
        .0
        .clone();
    let mut hs = Vec::new();
    for i in 0..bad_n {
        let (stop, big) = (stop.clone(), big.clone());
        hs.push(std::thread::spawn(move || hostile(addr, &big, i, &stop)));
    }
    // The hostile clients get their bodies going first.
    std::thread::sleep(Duration::from_millis(if bad_n > 0 { 500 } else { 0 }));
    for i in 0..good_n {
        let (stop, tally, files) = (stop.clone(), tally.clone(), files.clone());
        hs.push(std::thread::spawn(move || {
            good(addr, &files, 1000 + i as u64, &stop, &tally)
        }));
    }
    std::thread::sleep(PHASE);
    stop.store(true, Ordering::SeqCst);
    for h in hs {
        h.join().expect("client thread");
    }
    tally
}

/// Peak RSS of process PID, in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    st.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

#[test]
fn two_hundred_clients_stallers_and_quitters_do_not_hurt_the_others() {
    let s = scratch("serve-load");
    let store = shared_store();
    store.image("v1");
    store.image("v2");
    let srv = Server::local(&store.dir, &s.join("serve.log"));
    let files = Arc::new(targets(&store.dir));
    let good_n = CLIENTS - HOSTILE;

    // Alone, with the hostile clients, alone again: the baseline is the
    // mean of the two alone phases (the machine's own load drifts).
    let alone = phase(srv.addr, &files, good_n, 0);
    let loaded = phase(srv.addr, &files, good_n, HOSTILE);
    let again = phase(srv.addr, &files, good_n, 0);
    let rss = peak_rss_kib(srv.pid());
    let g = |t: &Tally, k: fn(&Tally) -> &AtomicU64| k(t).load(Ordering::Relaxed);
    let b_alone = (g(&alone, |t| &t.bytes) + g(&again, |t| &t.bytes)) / 2;
    let b_loaded = g(&loaded, |t| &t.bytes);
    eprintln!(
        "serve under load: alone (mean of two) {} requests {} MiB; with {HOSTILE} hostile {} requests {} MiB (ratio {:.2}); server peak RSS {rss} KiB",
        (g(&alone, |t| &t.requests) + g(&again, |t| &t.requests)) / 2,
        b_alone >> 20,
        g(&loaded, |t| &t.requests),
        b_loaded >> 20,
        b_loaded as f64 / b_alone.max(1) as f64
    );
    for (name, t) in [("alone", &alone), ("loaded", &loaded), ("again", &again)] {
        assert_eq!(g(t, |t| &t.server_errors), 0, "{name}: 5xx answers");
        assert_eq!(g(t, |t| &t.failures), 0, "{name}: failed requests");
        assert!(
            g(t, |t| &t.requests) > 100,
            "{name}: too few requests to judge"
        );
    }
    assert!(
        b_loaded * 2 >= b_alone,
        "hostile clients halved the others' throughput: {b_loaded} vs {b_alone} bytes"
    );
    assert!(
        rss <= MAX_SERVER_RSS_KIB,
        "server peak RSS {rss} KiB > {MAX_SERVER_RSS_KIB} KiB"
    );
    let log = srv.log();
    assert!(
        !log.contains("\" 5"),
        "the access log shows 5xx answers:\n{}",
        clip(&log, 20)
    );
}
