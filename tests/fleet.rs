//! Fleet rollout against a real etcd (SPEC §10), 12 simulated nodes in
//! group `compute` with `max_unavailable = 3` unless said otherwise; each
//! node a root directory, an `imageupd agent` and a loopback HTTP service
//! its hooks stop and start (see tests/common/fleet.rs).
//!
//! - a rollout never has more than 3 services down (20 ms prober), nor more
//!   than 3 windows open (the hooks' timestamps), nor more than 3 claims at
//!   any etcd revision; every node ends on the new image (verify, oracle);
//!   the checkers catch a violation (positive controls);
//! - a failing required health check rolls its node back in place and,
//!   with `max_failures = 1`, halts the group until `fleet resume`;
//! - `kill -9` of an agent inside its window: its slot stays taken while
//!   its service is down; restarted, it converges and releases;
//! - etcd down longer than the lease: no window opens, the open ones
//!   complete, the rollout finishes after the restart;
//! - `rollout_percent = 25`: exactly the nodes whose bucket is below 25;
//! - outside the maintenance window no node quiesces.

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::fleet::*;
use common::*;
use serde_json::json;

/// One fleet at a time: 12 agents each are enough load for a 2-core box.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Claims under the group at every revision since `from`.
fn claims_history(f: &Fleet, from: i64) -> common::etcd::History {
    f.etcd
        .history(&format!("{PREFIX}/groups/{GROUP}/claims/"), from)
}

#[test]
fn checkers_catch_violations() {
    // Four windows overlapping: the sweep must say 4.
    let ev = |n: &str, s: bool, t: i128| (n.to_string(), s, t);
    let four = vec![
        ev("a", true, 0),
        ev("b", true, 1),
        ev("c", true, 2),
        ev("d", true, 3),
        ev("a", false, 10),
        ev("b", false, 11),
        ev("c", false, 12),
        ev("d", false, 13),
    ];
    assert_eq!(max_overlap(&four), 4);
    let staggered = vec![
        ev("a", true, 0),
        ev("a", false, 5),
        ev("b", true, 5),
        ev("b", false, 9),
    ];
    assert_eq!(
        max_overlap(&staggered),
        1,
        "back to back is not overlapping"
    );
    let never_closed = vec![
        ev("a", true, 0),
        ev("b", true, 1),
        ev("b", false, 2),
        ev("c", true, 3),
    ];
    assert_eq!(max_overlap(&never_closed), 2);
    let k = |s: &str| (s.to_string(), 1, String::new());
    let h = vec![
        (1, vec![k("x")]),
        (2, vec![k("x"), k("y"), k("z"), k("w")]),
        (3, vec![]),
    ];
    assert_eq!(max_keys(&h), 4);
}

#[test]
fn rollout_keeps_capacity_and_completes() {
    let _g = serial();
    let mut f = Fleet::new("fleet-a", &FleetSpec::default());
    f.start_agents();
    f.wait_registered();
    let rev0 = f.etcd.revision();
    let n = f.nodes.len();
    let probe = f.prober();
    let t0 = Instant::now();
    let flip = now_ns();
    f.want_all("B", &json!({}));
    let ids = f.ids();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    f.wait_converged(&ids, "B", Duration::from_secs(150));
    let wall = t0.elapsed();
    let (samples, min_up) = probe.finish();
    let ev = f.events();
    let overlap = max_overlap(&ev);
    let hist = claims_history(&f, rev0);
    let max_claims = max_keys(&hist);
    let stops: Vec<i128> = ev.iter().filter(|e| e.1).map(|e| e.2 - flip).collect();
    let mean_wait_ms = stops.iter().sum::<i128>() as f64 / stops.len().max(1) as f64 / 1e6;
    eprintln!(
        "FIGURES rollout: {n} nodes in {wall:.1?}; {samples} probe samples, min up {min_up}; max windows open {overlap}; max claims at a revision {max_claims} over {} revisions; mean flip->window start {mean_wait_ms:.0} ms",
        hist.len()
    );
    assert!(samples > 100, "the prober ran ({samples} samples)");
    assert!(
        min_up >= n - 3,
        "at some sample only {min_up} of {n} services were up\n{}",
        f.describe()
    );
    assert!(
        min_up < n,
        "the prober never saw a service down: it cannot be measuring"
    );
    assert!(
        overlap <= 3,
        "{overlap} windows were open at once\n{}",
        f.describe()
    );
    assert!(
        overlap >= 2,
        "windows never overlapped: the slots were not used in parallel"
    );
    assert!(max_claims <= 3, "{max_claims} claims at one revision");
    assert_eq!(
        max_claims, 3,
        "three slots were used at once at some revision"
    );
    assert_eq!(stops.len(), n, "one window per node: {ev:?}");
    f.assert_on(&ids, "B");
    let st = imageupd(["status", "--json", "--root"])
        .arg(&f.nodes[0].root)
        .ok()
        .json();
    assert_eq!(st["health"]["passed"], true, "{st:#}");
    assert_eq!(st["rollout"]["node"], "node00", "{st:#}");
}

#[test]
fn failing_health_check_rolls_back_and_halts() {
    let _g = serial();
    let spec = FleetSpec {
        rollout: "max_unavailable = 3\nmax_failures = 1\n".into(),
        images: vec!["A".into(), "B".into(), "C".into()],
        ..Default::default()
    };
    let mut f = Fleet::new("fleet-b", &spec);
    // node07's application does not work on B.
    f.node("node07").check(
        "required",
        "20-app-works",
        "[ \"$IMAGEUPD_TO\" != B ] || { echo 'app broken on B' >&2; exit 1; }",
    );
    f.start_agents();
    f.wait_registered();
    let probe = f.prober();
    // node07 first, so that the breaker trips early.
    f.node("node07").want("B", &f.store, &json!({}));
    f.wait(Duration::from_secs(60), "node07's window", |f| {
        f.events().iter().any(|e| e.0 == "node07" && e.1)
    });
    f.want_all("B", &json!({}));
    f.wait(Duration::from_secs(90), "the halt", |f| {
        !f.keys("halted").is_empty()
    });
    let halted_rev = f.keys("halted")[0].1;
    // In-flight nodes finish; nothing new starts.
    f.wait(
        Duration::from_secs(60),
        "in-flight windows to finish",
        |f| f.keys("claims/").is_empty(),
    );
    std::thread::sleep(Duration::from_secs(3));
    for (rev, keys) in claims_history(&f, halted_rev) {
        for (k, created, v) in keys {
            assert!(
                created <= halted_rev,
                "claim {k} ({v}) created at rev {created}, after the halt at {halted_rev}\n{}",
                f.describe()
            );
        }
        let _ = rev;
    }
    let n07 = f.node("node07");
    assert_eq!(
        n07.image().as_deref(),
        Some("A"),
        "node07 rolled back\n{}",
        f.describe()
    );
    f.assert_on(&["node07"], "A");
    assert!(n07.log().contains("rolled back in place"), "{}", n07.log());
    let st = imageupd(["status", "--json", "--root"])
        .arg(&n07.root)
        .ok()
        .json();
    assert_eq!(st["health_failed"]["target"], "B", "{st:#}");
    assert_eq!(st["health"]["passed"], false, "{st:#}");
    assert!(st["rollout"]["halted"]["target"] == "B", "{st:#}");
    let failed = f.keys("failed/");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].0.ends_with("/node07"));
    let on_a: Vec<String> = f
        .nodes
        .iter()
        .filter(|n| n.image().as_deref() == Some("A"))
        .map(|n| n.id.clone())
        .collect();
    assert!(
        on_a.len() >= 3,
        "the breaker stopped the rollout early: still on A: {on_a:?}\n{}",
        f.describe()
    );
    let fs = imageupd(["fleet", "status", "--json", "--etcd", &f.etcd.url])
        .ok()
        .json();
    assert_eq!(fs["groups"][0]["halted"]["target"], "B", "{fs:#}");
    let text = imageupd(["fleet", "status", "--etcd", &f.etcd.url])
        .ok()
        .stdout;
    assert!(
        text.contains("HALTED") && text.contains("failed: node07"),
        "{text}"
    );
    // Resume with a fixed image: everyone converges on C.
    imageupd(["fleet", "resume", GROUP, "--etcd", &f.etcd.url]).ok();
    f.want_all("C", &json!({}));
    let ids = f.ids();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    f.wait_converged(&ids, "C", Duration::from_secs(150));
    let (_, min_up) = probe.finish();
    assert!(min_up >= f.nodes.len() - 3, "min up {min_up}");
    assert!(max_overlap(&f.events()) <= 3);
    f.assert_on(&ids, "C");
    assert!(
        f.keys("failed/").is_empty(),
        "node07's record goes once it passed on C"
    );
}

#[test]
fn killed_holder_keeps_its_slot_until_it_converges() {
    let _g = serial();
    let mut f = Fleet::new("fleet-c", &FleetSpec::default());
    f.start_agents();
    f.wait_registered();
    let probe = f.prober();
    f.want_all("B", &json!({}));
    let victim = f.wait_first_window();
    let vi = f.nodes.iter().position(|n| n.id == victim).unwrap();
    f.nodes[vi].kill_agent();
    let claim = f
        .keys("claims/")
        .into_iter()
        .find(|c| c.2.contains(&format!("\"{victim}\"")))
        .expect("the victim's claim");
    // Longer than the lease (3 s): the claim stays the victim's, while its
    // service is down.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        let now = f.keys("claims/");
        let c = now
            .iter()
            .find(|c| c.0 == claim.0)
            .unwrap_or_else(|| panic!("slot {} was freed\n{}", claim.0, f.describe()));
        assert!(
            c.2.contains(&format!("\"{victim}\"")),
            "slot {} taken by another node: {}",
            claim.0,
            c.2
        );
        assert!(now.len() <= 3);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !f.nodes[vi].up(),
        "the victim's service stays down until its agent is back"
    );
    let text = imageupd(["fleet", "status", "--etcd", &f.etcd.url])
        .ok()
        .stdout;
    assert!(text.contains("lease gone"), "{text}");
    f.nodes[vi].start_agent();
    let ids = f.ids();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    f.wait_converged(&ids, "B", Duration::from_secs(150));
    let (_, min_up) = probe.finish();
    assert!(min_up >= 9, "min up {min_up}");
    assert!(max_overlap(&f.events()) <= 3, "{}", f.describe());
    f.assert_on(&ids, "B");
    assert!(
        f.nodes[vi].log().contains("slot") && f.nodes[vi].log().contains("released"),
        "{}",
        f.nodes[vi].log()
    );
}

#[test]
fn killed_during_its_gate_the_holder_settles_after_restart() {
    let _g = serial();
    let spec = FleetSpec {
        nodes: 3,
        rollout: "max_unavailable = 1\n".into(),
        ..Default::default()
    };
    let mut f = Fleet::new("fleet-g", &spec);
    let marks = f.s.join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    for n in &f.nodes {
        let m = marks.display();
        n.check(
            "required",
            "20-slow",
            &format!("touch {m}/gating-{}; [ -e {m}/fast ] || sleep 5", n.id),
        );
    }
    f.start_agents();
    f.wait_registered();
    f.want_all("B", &json!({}));
    let gating = |f: &Fleet| {
        f.ids()
            .into_iter()
            .find(|i| f.s.join("marks").join(format!("gating-{i}")).exists())
    };
    f.wait(Duration::from_secs(60), "a node in its gate", |f| {
        gating(f).is_some()
    });
    let victim = gating(&f).unwrap();
    let vi = f.nodes.iter().position(|n| n.id == victim).unwrap();
    f.nodes[vi].kill_agent();
    let killed = now_ns();
    std::fs::write(marks.join("fast"), "").unwrap();
    // Longer than the lease: with one slot, nobody else may quiesce.
    std::thread::sleep(Duration::from_secs(6));
    let claims = f.keys("claims/");
    assert_eq!(claims.len(), 1, "{claims:?}");
    assert!(claims[0].2.contains(&format!("\"{victim}\"")), "{claims:?}");
    let late: Vec<_> = f
        .events()
        .into_iter()
        .filter(|e| e.1 && e.2 > killed)
        .collect();
    assert!(
        late.is_empty(),
        "a window opened while the victim held the only slot: {late:?}"
    );
    f.nodes[vi].start_agent();
    let ids = f.ids();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    f.wait_converged(&ids, "B", Duration::from_secs(90));
    assert!(max_overlap(&f.events()) <= 1);
    f.assert_on(&ids, "B");
    let log = f.nodes[vi].log();
    assert!(log.contains("found our in-progress record"), "{log}");
}

#[test]
fn etcd_outage_fails_closed() {
    let _g = serial();
    let mut f = Fleet::new("fleet-d", &FleetSpec::default());
    f.start_agents();
    f.wait_registered();
    let probe = f.prober();
    f.want_all("B", &json!({}));
    f.wait_first_window();
    f.etcd.kill();
    let killed = now_ns();
    std::thread::sleep(Duration::from_secs(8));
    let ev = f.events();
    let late: Vec<_> = ev
        .iter()
        .filter(|e| e.1 && e.2 > killed + 2_000_000_000)
        .collect();
    assert!(
        late.is_empty(),
        "windows opened while etcd was down: {late:?}"
    );
    for (n, _, _) in ev.iter().filter(|e| e.1) {
        assert!(
            ev.iter().any(|e| &e.0 == n && !e.1),
            "{n}'s window did not complete while etcd was down"
        );
    }
    f.etcd.restart();
    let ids = f.ids();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    f.wait_converged(&ids, "B", Duration::from_secs(150));
    let (_, min_up) = probe.finish();
    assert!(min_up >= 9, "min up {min_up}");
    assert!(max_overlap(&f.events()) <= 3);
    f.assert_on(&ids, "B");
}

/// The bucket, computed apart from imageupd: sha256(target ‖ 0 ‖ node),
/// first 8 bytes big-endian, scaled to [0, 100).
fn bucket(target: &str, node: &str) -> f64 {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest([target.as_bytes(), &[0], node.as_bytes()].concat());
    u64::from_be_bytes(d[..8].try_into().unwrap()) as f64 / 2f64.powi(64) * 100.0
}

#[test]
fn phased_rollout_admits_exactly_the_low_buckets() {
    let _g = serial();
    let ids: Vec<String> = (0..12).map(|i| format!("node{i:02}")).collect();
    // A target id whose 25 % is neither nobody nor nearly everybody.
    let target = (0..)
        .map(|i| format!("B{i}"))
        .find(|t| (2..=6).contains(&ids.iter().filter(|n| bucket(t, n) < 25.0).count()))
        .unwrap();
    let spec = FleetSpec {
        images: vec!["A".into(), target.clone()],
        ..Default::default()
    };
    let mut f = Fleet::new("fleet-e", &spec);
    f.start_agents();
    f.wait_registered();
    let admitted: Vec<&str> = ids
        .iter()
        .filter(|n| bucket(&target, n) < 25.0)
        .map(String::as_str)
        .collect();
    f.want_all(&target, &json!({"rollout_percent": 25}));
    f.wait_converged(&admitted, &target, Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(4));
    for n in &f.nodes {
        let want = if admitted.contains(&n.id.as_str()) {
            target.as_str()
        } else {
            "A"
        };
        assert_eq!(
            n.image().as_deref(),
            Some(want),
            "{} (bucket {:.2})\n{}",
            n.id,
            bucket(&target, &n.id),
            f.describe()
        );
    }
    let others: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|n| !admitted.contains(n))
        .collect();
    f.assert_on(&admitted, &target);
    f.assert_on(&others, "A");
    let node = f
        .nodes
        .iter()
        .find(|n| !admitted.contains(&n.id.as_str()))
        .unwrap();
    let st = imageupd(["status", "--json", "--root"])
        .arg(&node.root)
        .ok()
        .json();
    assert!(
        st["rollout"]["state"]["why"]
            .as_str()
            .unwrap_or("")
            .contains("phased"),
        "{st:#}"
    );
    eprintln!("FIGURES phased: target {target}, admitted {admitted:?}");
}

#[test]
fn no_quiesce_outside_the_maintenance_window() {
    let _g = serial();
    // A one-hour window starting in 12 hours (UTC).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let at = now + 12 * 3600;
    let day = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][((at / 86400) % 7) as usize];
    let hm = format!("{:02}:{:02}", (at % 86400) / 3600, (at % 3600) / 60);
    let window = format!(
        "[[rollout.window]]\ndays = [\"{day}\"]\nstart_time = \"{hm}\"\nlength_minutes = 60\n"
    );
    let spec = FleetSpec {
        nodes: 4,
        rollout: format!("max_unavailable = 3\n{window}"),
        ..Default::default()
    };
    let mut f = Fleet::new("fleet-f", &spec);
    f.start_agents();
    f.wait_registered();
    f.want_all("B", &json!({}));
    f.wait(
        Duration::from_secs(60),
        "every node waiting for the window",
        |f| {
            f.keys("nodes/")
                .iter()
                .filter(|k| k.2.contains("maintenance window"))
                .count()
                == f.nodes.len()
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        f.events().is_empty(),
        "a node quiesced outside its window: {:?}",
        f.events()
    );
    assert!(f.keys("claims/").is_empty());
    assert!(f
        .nodes
        .iter()
        .all(|n| n.image().as_deref() == Some("A") && n.up()));
    // Positive control: a window that covers now lets them through (the
    // waiting nodes re-read their configuration). It is written in the
    // local time of an IANA zone, Asia/Kathmandu (UTC+05:45, no DST), set
    // by a config.d fragment: read as UTC, that window would not be open.
    let local = now + 5 * 3600 + 45 * 60;
    let day_now = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][((local / 86400) % 7) as usize];
    let hm_now = format!("{:02}:{:02}", (local % 86400) / 3600, (local % 3600) / 60);
    for n in &f.nodes {
        let d = n.root.join("etc/imageupd/config.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("50-zone.toml"),
            "[rollout]\ntime_zone = \"Asia/Kathmandu\"\n",
        )
        .unwrap();
        let p = n.root.join("etc/imageupd/config.toml");
        let c = std::fs::read_to_string(&p).unwrap().replace(
            &format!("days = [\"{day}\"]\nstart_time = \"{hm}\""),
            &format!("days = [\"{day_now}\"]\nstart_time = \"{hm_now}\""),
        );
        std::fs::write(&p, c).unwrap();
    }
    let ids = f.ids();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    f.wait_converged(&ids, "B", Duration::from_secs(90));
    f.assert_on(&ids, "B");
}

#[test]
fn operator_release_and_resume() {
    let _g = serial();
    let etcd = common::etcd::EtcdServer::start("ops");
    let b = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    let base = format!("{PREFIX}/groups/{GROUP}/");
    for (k, v) in [
        ("claims/0", r#"{"node":"ghost","target":"B","since_ms":1}"#),
        (
            "inprogress/ghost",
            r#"{"slot":0,"target":"B","since_ms":1}"#,
        ),
        (
            "halted",
            r#"{"target":"B","failures":1,"by":"ghost","at_ms":2}"#,
        ),
    ] {
        etcd.call(
            "/v3/kv/put",
            json!({"key": b(&format!("{base}{k}")), "value": b(v)}),
        )
        .expect("put");
    }
    let url = etcd.url.clone();
    let text = imageupd(["fleet", "status", "--etcd", &url]).ok().stdout;
    assert!(text.contains("slot 0: ghost -> B (lease gone"), "{text}");
    assert!(
        text.contains("HALTED") && text.contains("in progress: ghost"),
        "{text}"
    );
    let j = imageupd([
        "fleet", "status", "--json", "--etcd", &url, "--group", GROUP,
    ])
    .ok()
    .json();
    assert_eq!(j["groups"][0]["holders_without_lease"][0], "ghost", "{j:#}");
    let out = imageupd([
        "fleet", "release", "ghost", "--group", GROUP, "--etcd", &url,
    ])
    .ok()
    .json();
    assert_eq!(out["released_slots"][0], 0, "{out:#}");
    assert!(etcd.range(&format!("{base}claims/"), 0).is_empty());
    assert!(etcd.range(&format!("{base}inprogress/"), 0).is_empty());
    let again = imageupd([
        "fleet", "release", "ghost", "--group", GROUP, "--etcd", &url,
    ])
    .run();
    assert_ne!(
        again.code(),
        Some(0),
        "releasing nothing is an error\n{}",
        again.describe()
    );
    assert!(
        again.stderr.contains("holds no slot"),
        "{}",
        again.describe()
    );
    let r = imageupd(["fleet", "resume", GROUP, "--etcd", &url])
        .ok()
        .json();
    assert_eq!(r["was_halted"], true);
    assert!(etcd.range(&format!("{base}halted"), 0).is_empty());
    // Without [rollout] and without --etcd: a usage error.
    let s = scratch("fleet-ops");
    let none = imageupd(["fleet", "status", "--root"]).arg(s.path()).run();
    assert_eq!(none.code(), Some(EXIT_USAGE), "{}", none.describe());
}

#[test]
fn apply_from_metadata_takes_a_slot_too() {
    let _g = serial();
    let spec = FleetSpec {
        nodes: 2,
        ..Default::default()
    };
    let f = Fleet::new("fleet-h", &spec);
    let n = &f.nodes[0];
    // Phase 0 %: held back, exit 0, nothing changed.
    n.want("B", &f.store, &json!({"rollout_percent": 0}));
    let out = imageupd(["apply", "--from-metadata", "--json", "--root"])
        .arg(&n.root)
        .ok();
    assert_eq!(out.json()["result"], "held-back", "{}", out.describe());
    assert_eq!(n.image().as_deref(), Some("A"));
    assert!(f.events().is_empty());
    // Everyone admitted: one window, under a claim, released after the gate.
    n.want("B", &f.store, &json!({"rollout_percent": 100}));
    let out = imageupd(["apply", "--from-metadata", "--json", "--root"])
        .arg(&n.root)
        .ok();
    assert_eq!(out.json()["result"], "applied", "{}", out.describe());
    f.assert_on(&["node00"], "B");
    assert_eq!(f.events().len(), 2, "{:?}", f.events());
    assert!(f.keys("claims/").is_empty() && f.keys("inprogress/").is_empty());
    let rev0 = 1;
    let hist = f
        .etcd
        .history(&format!("{PREFIX}/groups/{GROUP}/claims/"), rev0);
    assert_eq!(max_keys(&hist), 1, "the update held a slot");
    let st = imageupd(["status", "--json", "--root"])
        .arg(&n.root)
        .ok()
        .json();
    assert_eq!(st["health"]["passed"], true, "{st:#}");
}
