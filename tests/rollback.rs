//! Rollback in place without the network (issue 11): a node on v1 whose
//! metadata names v2 on an `imageupd serve` over HTTP; its required health
//! check fails on v2, so `apply --from-metadata` rolls it back to v1 from
//! the inodes the swap replaced (kept in `var/lib/imageupd/keep`) and the
//! node's record of v1's manifest.
//!
//! - the root is v1 again by the oracle (rsync and the metadata walk) and
//!   `verify --checksum`, and the server's access log has no request from
//!   the moment the gate ran (the check writes the log's length) to the
//!   end; the update itself did go over HTTP (requests before the mark);
//! - positive control: the same with the keep area removed by the check
//!   before the rollback: the rollback still reaches v1, through requests
//!   the access log shows — so the count does see network use;
//! - the rollback's and the swap's times are printed (FIGURES).

mod common;

use std::path::{Path, PathBuf};

use common::serve::Server;
use common::*;

/// A node at v1 with a metadata file naming v2 at `url`, and a required
/// health check that fails on v2, first writing the number of GET lines
/// of `access_log` to `mark` (and, with `drop_keep`, removing the keep
/// area).
fn node(s: &Scratch, url: &str, access_log: &Path, drop_keep: bool) -> (PathBuf, PathBuf) {
    let root = s.join("root");
    node_at("v1", &root);
    let meta = s.join("meta.json");
    std::fs::write(
        &meta,
        serde_json::json!({"image_id": "v2", "image_source": url}).to_string(),
    )
    .unwrap();
    write_config(
        &root,
        &format!(
            "[agent]\nmetadata_file = \"{}\"\n\n[health]\ntimeout_secs = 20\n",
            meta.display()
        ),
    );
    let mark = s.join("mark");
    let drop = if drop_keep {
        "rm -rf \"$IMAGEUPD_ROOT/var/lib/imageupd/keep\"\n"
    } else {
        ""
    };
    write_script(
        &root.join("etc/imageupd/health.d/required.d/20-app-works"),
        &format!(
            "set -u\nls \"$IMAGEUPD_ROOT/var/lib/imageupd/keep\" 2>/dev/null | wc -l > {m}.keep\ngrep -c '\"GET /' {log} > {m} || true\n{drop}[ \"$IMAGEUPD_TO\" != v2 ] || {{ echo 'app broken on v2' >&2; exit 1; }}\n",
            m = mark.display(),
            log = access_log.display(),
        ),
    );
    (root, mark)
}

/// The first number after `key` in `log`.
fn ms_after(log: &str, key: &str) -> Option<u64> {
    let rest = &log[log.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Run the scenario; (server GETs before the mark, GETs after it, output).
fn roll(name: &str, drop_keep: bool) -> (usize, usize, Out, Scratch) {
    let store = shared_store();
    let v1 = store.image("v1");
    store.image("v2");
    let s = scratch(name);
    let access = s.join("access.log");
    let server = Server::local(&store.dir, &access);
    let (root, mark) = node(&s, &server.url, &access, drop_keep);
    let out = imageupd(["apply", "--from-metadata", "--root"])
        .arg(&root)
        .env("IMAGEUPD_LOG", "info")
        .run();
    assert_ne!(
        out.code(),
        Some(EXIT_OK),
        "the gate failed: the apply must say so\n{}",
        out.describe()
    );
    let log = out.all_output();
    assert!(
        log.contains("rolled back in place from v2 to v1"),
        "{}",
        out.describe()
    );
    assert_eq!(image_id(&root).as_deref(), Some("v1"), "{}", out.describe());
    assert_converged(&v1, &root, &format!("{name}: rolled back to v1"));
    let v = verify(&root, true);
    assert_eq!(v.code(), Some(EXIT_OK), "verify\n{}", v.describe());
    assert!(
        !root.join("var/lib/imageupd/keep").exists(),
        "the keep area is dropped after the rollback"
    );
    let kept: usize = std::fs::read_to_string(s.join("mark.keep"))
        .expect("the check counted the keep area")
        .trim()
        .parse()
        .expect("a count");
    assert!(kept > 0, "the update kept the replaced inodes ({kept})");
    let st = imageupd(["status", "--json", "--root"])
        .arg(&root)
        .ok()
        .json();
    assert_eq!(st["health_failed"]["target"], "v2", "{st:#}");
    assert_eq!(st["health_failed"]["back_to"], "v1", "{st:#}");
    let before: usize = std::fs::read_to_string(&mark)
        .expect("the check wrote the mark")
        .trim()
        .parse()
        .expect("a count");
    let after = server.gets().len() - before;
    let ap = log.find("applied v2 in").unwrap_or(0);
    let (apply_ms, swap_ms) = (
        ms_after(&log[ap..], "applied v2 in"),
        ms_after(&log[ap..], "(swap"),
    );
    let rb = log.find("rolled back in place from v2 to v1").unwrap_or(0);
    let (rb_ms, rb_swap) = (
        ms_after(&log[rb..], "to v1 in"),
        ms_after(&log[rb..], "(swap"),
    );
    eprintln!(
        "FIGURES {name}: v1->v2 apply {apply_ms:?} ms (swap {swap_ms:?} ms) over HTTP with {before} GETs; {kept} objects kept; rollback in place {rb_ms:?} ms (swap {rb_swap:?} ms) with {after} GETs"
    );
    (before, after, out, s)
}

#[test]
fn rollback_in_place_needs_no_network() {
    let (before, after, out, _s) = roll("rollback-keep", false);
    assert!(
        before > 0,
        "the update itself went over HTTP ({before} GETs)"
    );
    assert_eq!(
        after,
        0,
        "the rollback in place made {after} HTTP requests\n{}",
        out.describe()
    );
    assert!(
        out.all_output().contains("objects come from the keep area"),
        "{}",
        out.describe()
    );
}

#[test]
fn rollback_without_the_keep_area_uses_the_network() {
    // Positive control: the keep area is gone when the rollback starts.
    let (before, after, out, _s) = roll("rollback-nokeep", true);
    assert!(before > 0, "the update itself went over HTTP");
    assert!(
        after > 0,
        "without the keep area the rollback must fetch, and the access log must show it\n{}",
        out.describe()
    );
}

/// A `kill -9` in the middle of the rollback's removals (the third
/// removal moved aside; the update v1 -> v2 itself removes nothing, so
/// every such point is the rollback's): the next run finishes the rollback
/// from the keep area, still without the network, and the root is v1.
#[test]
fn rollback_killed_mid_removal_finishes_on_the_next_run() {
    let store = shared_store();
    let v1 = store.image("v1");
    store.image("v2");
    let s = scratch("rollback-killed");
    let access = s.join("access.log");
    let server = Server::local(&store.dir, &access);
    let (root, mark) = node(&s, &server.url, &access, false);
    let killed = imageupd(["apply", "--from-metadata", "--root"])
        .arg(&root)
        .env("IMAGEUPD_FAULT", "mid-delete:3")
        .run();
    assert!(
        killed.signal().is_some(),
        "the fault point must kill the rollback\n{}",
        killed.describe()
    );
    assert!(
        root.join("var/lib/imageupd/keep").exists(),
        "the keep area outlives a killed rollback"
    );
    let out = imageupd(["apply", "--from-metadata", "--root"])
        .arg(&root)
        .env("IMAGEUPD_LOG", "info")
        .run();
    assert_eq!(image_id(&root).as_deref(), Some("v1"), "{}", out.describe());
    assert_converged(&v1, &root, "a killed rollback, finished");
    let v = verify(&root, true);
    assert_eq!(v.code(), Some(EXIT_OK), "verify\n{}", v.describe());
    let before: usize = std::fs::read_to_string(&mark)
        .expect("the check wrote the mark")
        .trim()
        .parse()
        .expect("a count");
    let after = server.gets().len() - before;
    assert_eq!(
        after,
        0,
        "finishing the rollback made {after} HTTP requests\n{}",
        out.describe()
    );
    let st = imageupd(["status", "--json", "--root"])
        .arg(&root)
        .ok()
        .json();
    assert_eq!(st["health_failed"]["target"], "v2", "{st:#}");
}
