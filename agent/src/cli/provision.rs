//! `imageupd provision` (and `--whole-disk`): the command's output (human
//! or `--json`) and the optional report POSTed to the master.

use std::path::PathBuf;

use anyhow::{Context, Result};

use imageupd::provision::{self, ProvisionOptions};
use imageupd::sys::error::ExitKind;
use imageupd::sys::progress::Progress;

/// The command's arguments, as parsed.
pub(crate) struct Args {
    pub(crate) opts: ProvisionOptions,
    pub(crate) scheme: Option<PathBuf>,
    pub(crate) whole_disk: bool,
    pub(crate) configdrive: Option<PathBuf>,
    pub(crate) report_url: Option<String>,
}

fn read(p: &std::path::Path, what: &str) -> Result<String> {
    std::fs::read_to_string(p)
        .with_context(|| format!("reading the {what} {}", p.display()))
        .context(ExitKind::Usage)
}

/// Run it.
pub(crate) fn provision(mut a: Args) -> Result<u8> {
    a.opts.configdrive = match &a.configdrive {
        Some(p) => Some(read(p, "configdrive inputs")?),
        None => None,
    };
    if a.whole_disk {
        return whole_disk(&a);
    }
    if let Some(s) = &a.scheme {
        a.opts.scheme = read(s, "scheme")?;
    }
    let json = a.opts.json;
    let res = provision::run(&a.opts, &Progress::new(json));
    report(a.report_url.as_deref(), &a.opts.id, &res);
    let r = res?;
    if json {
        super::print_json(&r)?;
    } else if a.opts.dry_run {
        for d in &r.plan.disks {
            println!(
                "{} ({}, {} bytes, {}-byte sectors, {:?}{}):",
                d.name,
                d.path,
                d.size_bytes,
                d.sector_size,
                d.table,
                if d.boot { ", boot" } else { "" }
            );
            for p in &d.partitions {
                println!(
                    "  {:>2} {:<11} start {:>12} size {:>12} {:<5} {}",
                    p.number,
                    imageupd::provision::plan::role_name(p.role),
                    p.start_bytes,
                    p.size_bytes,
                    p.fs.map(imageupd::provision::mkfs::fstype).unwrap_or("-"),
                    p.mount.as_deref().unwrap_or("")
                );
            }
        }
    } else {
        println!(
            "{}: image {} on {} ({})",
            r.result,
            r.image,
            r.plan.boot_disk().path,
            r.plan_digest
        );
    }
    Ok(0)
}

/// `provision --whole-disk`.
fn whole_disk(a: &Args) -> Result<u8> {
    let res = provision::whole::run(&a.opts, &Progress::new(a.opts.json));
    report(a.report_url.as_deref(), &a.opts.id, &res);
    let r = res?;
    if a.opts.json {
        super::print_json(&r)?;
    } else {
        println!(
            "{}: image {} ({}, {} bytes) on {}",
            r.result, r.image, r.whole_disk.file, r.whole_disk.size, r.disk
        );
    }
    Ok(0)
}

/// With `--report-url`, POST the report or the error (failures to POST
/// are reported, they do not change the outcome).
fn report<T: serde::Serialize>(url: Option<&str>, image: &str, res: &Result<T>) {
    let Some(url) = url else { return };
    let body = match res {
        Ok(r) => serde_json::to_value(r).unwrap_or_default(),
        Err(e) => {
            serde_json::json!({"result": "failed", "image": image, "error": format!("{e:#}")})
        }
    };
    if let Err(e) = post(url, &body) {
        eprintln!("imageupd: could not POST the report to {url}: {e:#}");
    }
}

/// POST the report as JSON (bounded by a timeout; errors are reported,
/// they do not change the outcome).
fn post(url: &str, body: &serde_json::Value) -> Result<()> {
    let c = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let r = c
        .post(url)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body)?)
        .send()?;
    if !r.status().is_success() {
        anyhow::bail!("the master answered {}", r.status());
    }
    Ok(())
}
