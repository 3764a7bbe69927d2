//! The real TripleO tools driving imageupd (PyPI 14.1.0, venv from .ci/run):
//!
//! - os-collect-config `--one-time` with the `local` collector running real
//!   os-refresh-config over the repository's os-refresh-config/ scripts: a
//!   failing pre-apply hook fails the run, os-collect-config commits nothing
//!   and the read-only root is untouched; once the hook is fixed the next run
//!   updates the root v1 → v2; a further run does nothing, even forced.
//! - the os-collect-config daemon with the `request` collector polling
//!   Heat-style metadata (a `deployments` entry of group os-apply-config
//!   carrying image_id) from 127.0.0.1: editing the served document updates
//!   the root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::http::FileServer;
use common::nodekit;
use common::*;
use nodekit::*;

/// `os-collect-config --one-time ... local` over `local_dir`, with
/// os-refresh-config as its command.
fn occ_local(n: &TestNode, d: &Path, force: bool) -> Out {
    let mut r = Run::new(venv().join("bin/os-collect-config"))
        .arg("--one-time")
        .arg("--cachedir")
        .arg(d.join("cache"))
        .arg("--backup-cachedir")
        .arg(d.join("run"))
        .arg("--local-path")
        .arg(d.join("local"))
        .arg("--command")
        .arg(format!(
            "os-refresh-config --lockfile {}",
            d.join("orc.lock").display()
        ));
    if force {
        r = r.arg("--force");
    }
    r.arg("local")
        .env("PATH", tool_path())
        .env(
            "OS_REFRESH_CONFIG_BASE_DIR",
            repo_root().join("os-refresh-config"),
        )
        .env("IMAGEUPD_ROOT", &n.root)
        .env("IMAGEUPD_BIN", bin())
        .timeout(Duration::from_secs(600))
        .run()
}

fn local_metadata(d: &Path, id: &str, store: &Path) {
    let dir = d.join("local");
    std::fs::create_dir_all(&dir).unwrap();
    let doc =
        serde_json::json!({"image_id": id, "image_source": store, "other": {"service": "config"}});
    write_atomic(&dir.join("imageupd.json"), &doc.to_string());
}

#[test]
fn occ_one_time_runs_orc_scripts_and_survives_a_failing_hook() {
    let n = TestNode::new("orc", "", false);
    let v2 = fixture_tree("v2");
    let d = n.s.join("occ");
    local_metadata(&d, "v2", &n.store);

    // 1. A failing pre-apply hook: ORC fails, OCC commits nothing, the root
    //    is exactly as it was (and read-only again).
    n.hook(
        "pre-apply",
        "50-refuse",
        "echo 'refusing on purpose' >&2; exit 3",
    );
    let before = snapshot_root(&n.root);
    let out = occ_local(&n, &d, false);
    assert_ne!(
        out.code(),
        Some(0),
        "os-collect-config must report the failed command\n{}",
        out.describe()
    );
    assert!(
        out.all_output().contains("refusing on purpose"),
        "the hook's stderr reaches the log\n{}",
        out.describe()
    );
    assert_unchanged(&n.root, &before, "after a failing pre-apply hook");
    assert_eq!(image_id(&n.root).as_deref(), Some("v1"));
    assert_eq!(
        n.fs.readonly(),
        Some(true),
        "the root must be read-only again\n{}",
        out.describe()
    );
    let cache = d.join("cache");
    let last: Vec<PathBuf> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".last"))
        .collect();
    assert!(
        last.is_empty(),
        "os-collect-config must not commit after a failed command: {last:?}"
    );
    let st = n.status();
    assert_eq!(st["agent"]["last_result"], "failed", "{st:#}");
    assert!(
        st["agent"]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("pre-apply"),
        "{st:#}"
    );

    // 2. Fixed: the next run applies v2 through the pre-configure.d check and
    //    the configure.d apply.
    n.edit(|r| std::fs::remove_file(r.join("etc/imageupd/hooks/pre-apply.d/50-refuse")).unwrap());
    let t = Instant::now();
    let out = occ_local(&n, &d, false);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    eprintln!(
        "os-collect-config → os-refresh-config → imageupd v1→v2 took {:.1?}",
        t.elapsed()
    );
    let all = out.all_output();
    assert!(
        all.contains("imageupd: image v2 verified and planned"),
        "pre-configure.d step output\n{}",
        out.describe()
    );
    assert!(
        all.contains("imageupd: applied image v2"),
        "configure.d step output\n{}",
        out.describe()
    );
    assert_applied(
        &v2,
        &n.root,
        "v2",
        "after os-collect-config/os-refresh-config",
    );
    assert_eq!(n.fs.readonly(), Some(true));
    // The local collector keys each file by its basename: imageupd.json.
    assert!(
        cache.join("imageupd.json.json.last").exists(),
        "os-collect-config commits after success: {:?}",
        std::fs::read_dir(&cache)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    let st = n.status();
    assert_eq!(st["agent"]["last_applied"]["id"], "v2", "{st:#}");
    assert!(
        st["agent"]["last_applied"]["metadata_to_commit_ms"]
            .as_u64()
            .is_some(),
        "{st:#}"
    );
    assert!(st["agent"]["last_error"].is_null(), "{st:#}");

    // 3. Again: OCC sees no change and runs nothing; forced, the scripts run,
    //    find nothing to do and say nothing.
    let before = snapshot_root(&n.root);
    let out = occ_local(&n, &d, false);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let out = occ_local(&n, &d, true);
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    // (dib-run-parts names the scripts; the scripts themselves print
    // "imageupd: ..." lines only when they act or fail.)
    assert!(
        !out.all_output().lines().any(|l| l.starts_with("imageupd")),
        "the scripts must be silent when there is nothing to do\n{}",
        out.describe()
    );
    assert_unchanged(&n.root, &before, "after runs with nothing to do");
    assert_eq!(n.status()["agent"]["last_result"], "applied");
}

/// A child process killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn heat_doc(id: &str, store: &Path) -> String {
    serde_json::json!({
        "os-collect-config": {"request": {"metadata_url": "ignored"}},
        "deployments": [
            {"name": "other-software", "group": "script", "inputs": [], "config": "#!/bin/sh\ntrue\n"},
            {"name": "imageupd-image", "group": "os-apply-config", "inputs": [],
             "config": {"image_id": id, "image_source": store}}
        ]
    })
    .to_string()
}

#[test]
fn occ_daemon_request_collector_follows_served_heat_metadata() {
    let n = TestNode::new("occ-request", "", false);
    let v2 = fixture_tree("v2");
    let d = n.s.join("occ");
    let www = d.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let md = www.join("md.json");
    write_atomic(&md, &heat_doc("v1", &n.store));
    let server = FileServer::over(&www).start();
    let log = std::fs::File::create(d.join("occ.log")).unwrap();
    let occ = Command::new(venv().join("bin/os-collect-config"))
        .args([
            "--polling-interval",
            "1",
            "--min-polling-interval",
            "1",
            "--cachedir",
        ])
        .arg(d.join("cache"))
        .arg("--backup-cachedir")
        .arg(d.join("run"))
        .arg("--command")
        .arg(format!(
            "os-refresh-config --lockfile {}",
            d.join("orc.lock").display()
        ))
        .args([
            "--request-metadata-url",
            &format!("{}md.json", server.url),
            "request",
        ])
        .env_remove("OS_CONFIG_FILES")
        .env("LC_ALL", "C")
        .env("PATH", tool_path())
        .env(
            "OS_REFRESH_CONFIG_BASE_DIR",
            repo_root().join("os-refresh-config"),
        )
        .env("IMAGEUPD_ROOT", &n.root)
        .env("IMAGEUPD_BIN", bin())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _occ = Daemon(occ);
    let occ_log = || std::fs::read_to_string(d.join("occ.log")).unwrap_or_default();
    // The first poll runs os-refresh-config over v1 metadata: nothing to do.
    wait_for(
        Duration::from_secs(120),
        "the first os-refresh-config run",
        || {
            let l = occ_log();
            (l.contains("Completed phase configure")
                || l.contains("Completed phase post-configure"))
            .then_some(())
        },
    );
    assert_eq!(image_id(&n.root).as_deref(), Some("v1"), "{}", occ_log());
    let cached = std::fs::read_to_string(d.join("cache/imageupd-image.json"))
        .expect("OCC caches the deployment under its name");
    assert!(cached.contains("\"v1\""), "{cached}");

    // Edit the served document (Last-Modified must move forward).
    let t = Instant::now();
    write_atomic(&md, &heat_doc("v2", &n.store));
    std::fs::File::options()
        .write(true)
        .open(&md)
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    wait_for(Duration::from_secs(300), "the root to reach v2", || {
        (image_id(&n.root).as_deref() == Some("v2")).then_some(())
    });
    eprintln!("served metadata edit → root at v2 in {:.1?}", t.elapsed());
    // Let the run finish (commit) before checking the whole root.
    wait_for(
        Duration::from_secs(120),
        "os-collect-config to commit v2",
        || {
            std::fs::read_to_string(d.join("cache/imageupd-image.json.last"))
                .ok()
                .filter(|l| l.contains("\"v2\""))
                .map(|_| ())
        },
    );
    assert_applied(
        &v2,
        &n.root,
        "v2",
        &format!(
            "after the served metadata changed\n--- occ log ---\n{}",
            clip(&occ_log(), 60)
        ),
    );
    assert_eq!(n.fs.readonly(), Some(true));
}
