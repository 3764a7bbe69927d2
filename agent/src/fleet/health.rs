//! The health gate (greenboot's convention): after the post-apply hooks,
//! every executable in `etc/imageupd/health.d/required.d/` must pass and
//! those in `wanted.d/` are only reported. Names and order follow the hook
//! rules (`^[0-9A-Za-z_-]+$`, `sort -n`); each check has a time limit and
//! runs in its own process group, killed whole on a timeout. The last
//! report is kept in the runtime directory for `status --json`.

use std::io::{Read, Seek};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::config::HealthConfig;

/// Where checks live, relative to the root.
pub const HEALTH_SUBDIR: &str = "etc/imageupd/health.d";
/// File name of the last report, in the runtime directory.
pub const REPORT_NAME: &str = "health.json";
/// Most output kept per check, in bytes.
const TAIL_BYTES: u64 = 2048;
/// Poll interval while a check runs, in milliseconds.
const POLL_MS: u64 = 20;

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// File name.
    pub name: String,
    /// From `required.d` (else `wanted.d`).
    pub required: bool,
    /// Exited 0 in time.
    pub ok: bool,
    /// Exit code (None: killed, or did not start).
    pub code: Option<i32>,
    /// It ran past its time limit.
    pub timed_out: bool,
    /// Wall time, ms.
    pub ms: u64,
    /// End of its output (stdout and stderr).
    pub output: String,
}

/// The gate's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The image checked.
    pub target: String,
    /// Every required check passed (also after the bake time).
    pub passed: bool,
    /// Required checks that failed.
    pub required_failed: Vec<String>,
    /// Wanted checks that failed (reported only).
    pub wanted_failed: Vec<String>,
    /// Every check run, in order (both rounds when baking).
    pub checks: Vec<CheckResult>,
    /// Bake time waited, s.
    pub bake_secs: u64,
    /// When the gate finished, RFC 3339.
    pub at: String,
}

impl HealthReport {
    /// One line for logs.
    pub fn summary(&self) -> String {
        if self.passed {
            format!(
                "health gate passed for {} ({} checks{})",
                self.target,
                self.checks.len(),
                if self.wanted_failed.is_empty() {
                    String::new()
                } else {
                    format!("; wanted checks failed: {}", self.wanted_failed.join(", "))
                }
            )
        } else {
            format!(
                "health gate FAILED for {}: required checks failed: {}",
                self.target,
                self.required_failed.join(", ")
            )
        }
    }
}

/// The checks of one kind, in order.
pub fn select(root: &Path, required: bool) -> Vec<PathBuf> {
    let dir = root
        .join(HEALTH_SUBDIR)
        .join(if required { "required.d" } else { "wanted.d" });
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let (ordered, skipped) = crate::engine::hooks::order_hook_names(names);
    for (n, why) in skipped {
        tracing::warn!("skipping health check {}: {why}", dir.join(n).display());
    }
    ordered
        .into_iter()
        .map(|n| dir.join(n))
        .filter(|p| nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok())
        .collect()
}

/// Whether the root has any check.
pub fn any(root: &Path) -> bool {
    !select(root, true).is_empty() || !select(root, false).is_empty()
}

fn run_one(path: &Path, required: bool, env: &[(&str, String)], limit: Duration) -> CheckResult {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let start = Instant::now();
    let mut res = CheckResult {
        name,
        required,
        ok: false,
        code: None,
        timed_out: false,
        ms: 0,
        output: String::new(),
    };
    let out = match tempfile::tempfile() {
        Ok(f) => f,
        Err(e) => {
            res.output = format!("cannot make an output file: {e}");
            return res;
        }
    };
    let spawned = out.try_clone().and_then(|o2| {
        let o1 = out.try_clone()?;
        Command::new(path)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(o1)
            .stderr(o2)
            .process_group(0)
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            res.output = format!("cannot run it: {e}");
            return res;
        }
    };
    let mut wait_err = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() >= limit => {
                res.timed_out = true;
                let pg = nix::unistd::Pid::from_raw(child.id() as i32);
                if let Err(e) = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL) {
                    tracing::warn!(
                        "health check {}: cannot kill its process group at the timeout: {e}",
                        path.display()
                    );
                }
                if let Err(e) = child.wait() {
                    tracing::warn!("health check {}: cannot reap it: {e}", path.display());
                }
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(POLL_MS)),
            Err(e) => {
                // Counted as failed (no exit code); said in its output.
                wait_err = Some(e);
                break None;
            }
        }
    };
    res.ms = start.elapsed().as_millis() as u64;
    res.code = status.and_then(|s| s.code());
    res.ok = res.code == Some(0);
    res.output = match output_tail(out) {
        Ok(t) => t,
        Err(e) => format!("(its output cannot be read: {e})"),
    };
    if let Some(e) = wait_err {
        res.output = format!("cannot wait for it: {e}\n{}", res.output);
    }
    res
}

/// The last [`TAIL_BYTES`] of a check's output file.
fn output_tail(mut f: std::fs::File) -> std::io::Result<String> {
    let len = f.seek(std::io::SeekFrom::End(0))?;
    f.seek(std::io::SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).trim_end().to_owned())
}

fn round(root: &Path, env: &[(&str, String)], limit: Duration, into: &mut HealthReport) {
    for required in [true, false] {
        for p in select(root, required) {
            let r = run_one(&p, required, env, limit);
            if !r.ok {
                let list = if required {
                    &mut into.required_failed
                } else {
                    &mut into.wanted_failed
                };
                if !list.contains(&r.name) {
                    list.push(r.name.clone());
                }
            }
            tracing::info!(
                "health check {} ({}): {}{}",
                r.name,
                if required { "required" } else { "wanted" },
                if r.ok { "ok" } else { "FAILED" },
                if r.timed_out { " (timed out)" } else { "" }
            );
            into.checks.push(r);
        }
    }
}

/// Run the gate for `target` on `root`; `from` is the image before.
pub fn run_gate(root: &Path, cfg: &HealthConfig, target: &str, from: Option<&str>) -> HealthReport {
    let env = vec![
        ("IMAGEUPD_ROOT", root.display().to_string()),
        ("IMAGEUPD_TO", target.to_owned()),
        ("IMAGEUPD_FROM", from.unwrap_or("").to_owned()),
    ];
    let limit = Duration::from_secs(cfg.timeout_secs);
    let mut rep = HealthReport {
        target: target.to_owned(),
        ..Default::default()
    };
    round(root, &env, limit, &mut rep);
    if rep.required_failed.is_empty() && cfg.bake_secs > 0 {
        tracing::info!(
            "health gate: baking {} s before checking again",
            cfg.bake_secs
        );
        std::thread::sleep(Duration::from_secs(cfg.bake_secs));
        rep.bake_secs = cfg.bake_secs;
        round(root, &env, limit, &mut rep);
    }
    rep.passed = rep.required_failed.is_empty();
    rep.at = crate::sys::clock::now_rfc3339();
    rep
}

/// Keep the report for `status`.
pub fn save(rt: &Path, rep: &HealthReport) -> Result<()> {
    std::fs::create_dir_all(rt).with_context(|| format!("creating {}", rt.display()))?;
    crate::fs::store::write_volatile(&rt.join(REPORT_NAME), &serde_json::to_vec_pretty(rep)?)
}

/// The last report, if any.
pub fn load(rt: &Path) -> Option<HealthReport> {
    std::fs::read(rt.join(REPORT_NAME))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(p: &Path, body: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }

    #[test]
    fn required_wanted_timeout() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        let h = r.join(HEALTH_SUBDIR);
        script(
            &h.join("required.d/10-ok"),
            "echo fine; test \"$IMAGEUPD_TO\" = B",
        );
        script(&h.join("wanted.d/10-meh"), "echo meh >&2; exit 3");
        script(&h.join("wanted.d/skip.sh"), "exit 1");
        let cfg = HealthConfig {
            timeout_secs: 1,
            ..Default::default()
        };
        let rep = run_gate(r, &cfg, "B", Some("A"));
        assert!(rep.passed, "{rep:?}");
        assert_eq!(rep.wanted_failed, vec!["10-meh".to_string()]);
        assert_eq!(rep.checks.len(), 2);
        assert_eq!(rep.checks[1].output, "meh");
        assert!(!run_gate(r, &cfg, "C", None).passed);
        script(&h.join("required.d/20-hang"), "sleep 30");
        let t0 = Instant::now();
        let rep = run_gate(r, &cfg, "B", None);
        assert!(!rep.passed && rep.checks.iter().any(|c| c.timed_out));
        assert!(t0.elapsed() < Duration::from_secs(10));
    }
}
