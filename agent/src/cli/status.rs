//! `imageupd status`: what the node is on, what is pending, and what the
//! last update and the agent did.

use std::path::Path;

use anyhow::{Context, Result};

use super::print_json;
use imageupd::sys::error::ExitKind;

/// `imageupd status`.
pub(crate) fn status(root: &Path, json: bool) -> Result<u8> {
    let rf = imageupd::fs::rootfs::RootFs::open(root).context(ExitKind::Usage)?;
    let live = imageupd::engine::status::Status::load(&rf.runtime_dir())?;
    let journal = match rf.state_dir()? {
        Some(s) => imageupd::engine::journal::Journal::load(std::os::fd::AsFd::as_fd(&s))?,
        None => None,
    };
    let current = rf.image_id()?;
    let pending = journal
        .as_ref()
        .filter(|j| j.interrupted())
        .map(|j| j.target.clone());
    let agent = imageupd::agent::record::AgentRecord::load(&rf.runtime_dir())
        .ok()
        .filter(|a| *a != Default::default());
    let kernel = imageupd::boot::record::load(&rf)?;
    let reboot_required = kernel
        .as_ref()
        .is_some_and(|k| k.state == imageupd::boot::record::KernelState::Pending);
    if json {
        print_json(&serde_json::json!({
            "root": rf.path,
            "current": current,
            "pending": pending,
            "phase": live.as_ref().map_or(imageupd::engine::lifecycle::Phase::Idle, |s| s.phase),
            "journal": journal,
            "status": live,
            "agent": agent,
            "kernel": {
                "running": imageupd::fs::rootfs::running_release().filter(|_| rf.is_host_root()),
                "reboot_required": reboot_required,
                "record": kernel,
            },
            "health": imageupd::fleet::health::load(&rf.runtime_dir()),
            "health_failed": imageupd::fleet::failed_target(&rf.runtime_dir()),
            "rollout": imageupd::fleet::coord::FleetRecord::load(&rf.runtime_dir()),
        }))?;
    } else {
        println!("root:     {}", rf.path.display());
        println!("current:  {}", current.as_deref().unwrap_or("(none)"));
        if let Some(p) = &pending {
            println!("pending:  {p} (interrupted; `imageupd apply` converges)");
        }
        if let Some(s) = &live {
            println!("phase:    {}", s.phase);
            println!(
                "last:     {} {} at {}",
                s.result,
                s.target.as_deref().unwrap_or(""),
                s.updated
            );
            if s.reboot_required {
                println!(
                    "reboot:   required ({})",
                    s.reboot_reason.as_deref().unwrap_or("")
                );
            }
            if let Some(q) = s.quiesce_ms {
                println!("quiesce:  {q} ms");
            }
            if let Some(e) = &s.last_error {
                println!("error:    {e}");
            }
        }
        if let Some(k) = &kernel {
            let what = if reboot_required {
                "reboot:  "
            } else {
                "kernel:  "
            };
            println!("{what} {}", k.describe());
        }
        imageupd::fleet::print_status(&rf.runtime_dir());
        if let Some(a) = &agent {
            println!("agent:    {} ({})", a.state, a.metadata_source);
            if let Some(w) = &a.wanted {
                println!(
                    "wanted:   {w} from {}",
                    a.wanted_source.as_deref().unwrap_or("?")
                );
            }
            if let Some(e) = &a.metadata_error {
                println!("metadata: {e}");
            }
            if let Some(l) = &a.last_applied {
                if let Some(ms) = l.metadata_to_commit_ms {
                    println!(
                        "latency:  {ms} ms from the metadata write to the commit of {}",
                        l.id
                    );
                }
                if let Some(d) = &l.download {
                    println!(
                        "fetched:  {} in {} requests for {}",
                        imageupd::sys::progress::human_bytes(d.bytes),
                        d.requests,
                        l.id
                    );
                }
            }
            for (k, f) in &a.failures.by_target {
                println!(
                    "failing:  {k}: {} attempt(s), last: {}",
                    f.attempts, f.last_error
                );
            }
        }
    }
    Ok(0)
}
