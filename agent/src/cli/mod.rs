//! The subcommands of the command line, one function each: it calls the
//! library and prints what it returns (human text or `--json`), and gives
//! the exit code. Argument parsing stays in `main.rs`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use imageupd::apply::{self, ApplyOptions};
use imageupd::engine::config::KernelPolicy;
use imageupd::publish::image::{self as publish_image, PublishOptions};
use imageupd::sys::error::ExitKind;
use imageupd::sys::progress::{human_bytes, Progress};

pub(crate) mod fleet;
pub(crate) mod provision;
pub(crate) mod status;
pub(crate) mod trust;

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Worker threads: one per CPU.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// `imageupd serve`.
pub(crate) fn serve(
    store: PathBuf,
    listen: String,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    throttle: Option<u64>,
) -> Result<u8> {
    imageupd::publish::serve::serve(&imageupd::publish::serve::ServeOptions {
        store,
        listen,
        tls_cert,
        tls_key,
        throttle_bps: throttle,
    })?;
    Ok(0)
}

/// `imageupd keygen`.
pub(crate) fn keygen(out: &Path, comment: &str) -> Result<u8> {
    let vk = imageupd::format::sign::keygen(out, comment)?;
    println!(
        "wrote {} and {} (key id {})",
        out.display(),
        imageupd::format::sign::pub_path(out).display(),
        imageupd::format::sign::key_id(&vk)
    );
    Ok(0)
}

/// `imageupd publish`.
pub(crate) fn publish(opts: PublishOptions, source: &Path, json: bool) -> Result<u8> {
    let r = publish_image::publish(&opts, source, &Progress::new(json))?;
    if json {
        print_json(&r)?;
    } else {
        println!(
            "published {} (release {} on channel {}, {} entries, {}): {} new objects ({} compressed), {} shared{}{}",
            r.id,
            r.release,
            r.channel,
            r.entries,
            human_bytes(r.content_bytes),
            r.new_objects,
            human_bytes(r.new_object_bytes),
            r.reused_objects,
            if r.signed { ", signed" } else { ", UNSIGNED" },
            r.kernel
                .map(|k| format!(", kernel {k}"))
                .unwrap_or_default()
        );
    }
    Ok(0)
}

/// `imageupd verify`.
pub(crate) fn verify(root: &Path, checksum: bool, json: bool) -> Result<u8> {
    let r = imageupd::engine::verify::verify(root, checksum, threads())?;
    if json {
        print_json(&r)?;
    } else if r.clean() {
        println!(
            "{} matches image {} ({} entries checked{})",
            root.display(),
            r.id,
            r.checked,
            if checksum { ", contents hashed" } else { "" }
        );
    } else {
        println!("{} drifted from image {}:", root.display(), r.id);
        for d in &r.modified {
            println!("  modified {} ({})", d.path, d.what.join(", "));
        }
        for p in &r.missing {
            println!("  missing  {p}");
        }
        for p in &r.extra {
            println!("  extra    {p}");
        }
    }
    Ok(if r.clean() {
        0
    } else {
        ExitKind::Drift.code() as u8
    })
}

/// `imageupd reboot`.
pub(crate) fn reboot(root: &Path, kernel_policy: Option<KernelPolicy>) -> Result<u8> {
    let rf = imageupd::fs::rootfs::RootFs::open(root).context(ExitKind::Usage)?;
    let cfg = imageupd::engine::config::Config::load(&rf.path)?;
    let act = imageupd::boot::reboot::Actuator::host();
    match imageupd::boot::reboot::reboot_now(&act, &rf, &cfg, kernel_policy, &Progress::new(false))?
    {
        Some(a) => println!("{}: {}", rf.path.display(), a.as_str()),
        None => println!(
            "no kernel change is pending on {}: nothing to do",
            rf.path.display()
        ),
    }
    Ok(0)
}

/// `imageupd boot-check`.
pub(crate) fn boot_check(root: &Path, json: bool) -> Result<u8> {
    let rf = imageupd::fs::rootfs::RootFs::open(root).context(ExitKind::Usage)?;
    let r = imageupd::boot::confirm::confirm_boot(&rf)?;
    if json {
        print_json(&r)?;
    } else {
        if let Some(rec) = &r.record {
            println!("kernel:   {}", rec.describe());
        }
        for p in &r.pruned {
            println!("removed stale modules {p}");
        }
    }
    Ok(match &r.record {
        Some(rec) if rec.state == imageupd::boot::record::KernelState::Failed && r.confirmed => 1,
        _ => 0,
    })
}

/// `imageupd rollback`.
pub(crate) fn rollback(root: &Path, from: Option<String>, json: bool) -> Result<u8> {
    let r = apply::rollback(root, from, &Progress::new(json))?;
    if json {
        print_json(&r)?;
    } else {
        print!("{}", apply::human_summary(&r));
    }
    Ok(0)
}

/// `imageupd fault-points`.
pub(crate) fn fault_points() -> Result<u8> {
    for p in imageupd::sys::fault::POINTS {
        println!("{p}");
    }
    Ok(0)
}

/// `imageupd plan` and `imageupd apply`.
pub(crate) fn apply(
    target: crate::TargetArgs,
    root: crate::RootArg,
    kernel_policy: Option<KernelPolicy>,
    json: bool,
    dry_run: bool,
) -> Result<u8> {
    let r = if target.from_metadata {
        let o = imageupd::agent::from_metadata::FromMetadataOptions {
            root: root.root,
            from: target.from,
            allow_unsigned: target.allow_unsigned,
            allow_downgrade: target.allow_downgrade,
            kernel_policy,
            dry_run,
            ca_file: target.ca_file.clone(),
        };
        imageupd::agent::from_metadata::apply_from_metadata(&o, &Progress::new(json))?
    } else {
        let opts = ApplyOptions {
            root: root.root,
            from: target.from,
            id: target.id,
            allow_unsigned: target.allow_unsigned,
            allow_downgrade: target.allow_downgrade,
            kernel_policy,
            dry_run,
            cancel: None,
            ca_file: target.ca_file,
            slot: None,
            // No gate runs after an operator's apply: nothing to keep.
            keep_replaced: false,
        };
        apply::run(&opts, &Progress::new(json))?
    };
    if json {
        print_json(&r)?;
    } else {
        print!("{}", apply::human_summary(&r));
    }
    Ok(0)
}
