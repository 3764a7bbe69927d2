//! The shipped systemd units pass `systemd-analyze verify` with no warning
//! at all (unknown or misspelt settings are only warnings there), and the
//! shipped scripts are runnable: names that dib-run-parts and imageupd's own
//! hook runner accept, executable, valid bash.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

#[test]
fn systemd_units_verify_cleanly() {
    let s = scratch("units");
    for unit in ["imageupd-agent.service", "imageupd-publisher.service"] {
        let text = std::fs::read_to_string(repo_root().join("systemd").join(unit)).unwrap();
        // verify checks that ExecStart exists: point it at the built binary.
        std::fs::write(s.join(unit), text.replace("/usr/bin/imageupd", bin())).unwrap();
    }
    let out = Run::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(s.join("imageupd-agent.service"))
        .arg(s.join("imageupd-publisher.service"))
        .run();
    assert!(
        out.code() == Some(0) && out.stderr.trim().is_empty() && out.stdout.trim().is_empty(),
        "systemd-analyze verify must pass silently\n{}",
        out.describe()
    );
    // A broken unit is caught by the same check (the test can fail).
    let bad = std::fs::read_to_string(s.join("imageupd-agent.service"))
        .unwrap()
        .replace("Type=notify", "Type=notfy");
    std::fs::write(s.join("bad.service"), bad).unwrap();
    let out = Run::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(s.join("bad.service"))
        .run();
    assert!(
        !out.stderr.trim().is_empty(),
        "a misspelt setting must be reported\n{}",
        out.describe()
    );

    let agent =
        std::fs::read_to_string(repo_root().join("systemd/imageupd-agent.service")).unwrap();
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "KillMode=mixed",
        "ExecStart=/usr/bin/imageupd agent",
    ] {
        assert!(
            agent.lines().any(|l| l.starts_with(want)),
            "imageupd-agent.service lacks {want}"
        );
    }
    for forbidden in [
        "ProtectSystem=",
        "ReadOnlyPaths=",
        "RestrictSUIDSGID=",
        "PrivateTmp=",
    ] {
        assert!(
            !agent.lines().any(|l| l.starts_with(forbidden)),
            "imageupd-agent.service must be able to rewrite the root: {forbidden}"
        );
    }
    let publisher =
        std::fs::read_to_string(repo_root().join("systemd/imageupd-publisher.service")).unwrap();
    assert!(publisher.contains("ExecStart=/usr/bin/imageupd serve --store /var/lib/imageupd-store"));
}

fn check_scripts(dir: &Path) -> usize {
    let mut n = 0;
    for phase in std::fs::read_dir(dir).unwrap().flatten() {
        if !phase.path().is_dir() {
            continue;
        }
        for e in std::fs::read_dir(phase.path()).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'),
                "{}: name must match ^[0-9A-Za-z_-]+$",
                e.path().display()
            );
            let mode = std::fs::metadata(e.path()).unwrap().permissions().mode();
            assert!(
                mode & 0o111 == 0o111,
                "{} must be executable",
                e.path().display()
            );
            Run::new("bash").arg("-n").arg(e.path()).ok();
            n += 1;
        }
    }
    n
}

#[test]
fn shipped_scripts_are_runnable() {
    assert_eq!(check_scripts(&repo_root().join("os-refresh-config")), 2);
    assert!(check_scripts(&repo_root().join("hooks")) >= 5);
}
