//! The subcommands of the command line, one function each: it calls the
//! library and prints what it returns (human text or `--json`), and gives
//! the exit code. Argument parsing stays in `main.rs`.

use std::path::Path;

use anyhow::{Context, Result};

use imageupd::apply::{self, ApplyOptions};
use imageupd::engine::config::KernelPolicy;
use imageupd::publish::image::{self as publish_image, PublishOptions};
use imageupd::sys::error::ExitKind;
use imageupd::sys::progress::{human_bytes, Progress};

pub(crate) mod docs;
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
pub(crate) fn serve(opts: imageupd::publish::serve::ServeOptions) -> Result<u8> {
    imageupd::publish::serve::serve(&opts)?;
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

/// `imageupd config`.
pub(crate) fn config(root: &Path, json: bool) -> Result<u8> {
    let rf = imageupd::fs::rootfs::RootFs::open(root).context(ExitKind::Usage)?;
    let cfg = imageupd::engine::config::Config::load(&rf.path)?;
    let rollout = imageupd::fleet::config::rollout(&cfg)?;
    imageupd::fleet::config::health(&cfg)?;
    if json {
        print_json(&cfg)?;
    } else {
        println!("configuration of {}: valid", rf.path.display());
        if cfg.sources.is_empty() {
            println!("  no configuration files: defaults");
        }
        for s in &cfg.sources {
            println!("  read {}", s.display());
        }
        println!(
            "  kernel policy:  {}",
            imageupd::engine::config::policy_word(cfg.kernel_policy)
        );
        println!(
            "  metadata:       {}",
            cfg.agent.metadata_source(None).describe()
        );
        println!(
            "  default source: {}",
            cfg.agent.default_source.as_deref().unwrap_or("(none)")
        );
        println!(
            "  rollout:        {}",
            rollout.map_or(
                "none (apply as soon as the metadata says)".into(),
                |r| format!("group {} via {}", r.group, r.etcd.join(", "))
            )
        );
        println!(
            "  metrics file:   {}",
            imageupd::agent::metrics::path(&rf, &cfg).display()
        );
    }
    Ok(0)
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
pub(crate) fn rollback(
    root: &Path,
    from: Option<String>,
    json: bool,
    progress_fd: Option<u32>,
) -> Result<u8> {
    let progress = Progress::new(json).with_fd(progress_fd)?;
    let res = apply::rollback(root, from, &progress);
    write_metrics(root);
    progress_result(&progress, &res);
    let r = res?;
    if json {
        print_json(&r)?;
    } else {
        print!("{}", apply::human_summary(&r));
    }
    Ok(0)
}

/// After an apply or rollback, successful or not: the node's metrics
/// textfile. Failing to write it does not fail the command (the update is
/// what matters); it is logged.
fn write_metrics(root: &Path) {
    if let Err(e) = imageupd::agent::metrics::write_for(root) {
        tracing::warn!("could not write the metrics textfile: {e:#}");
    }
}

/// The last line on the progress fd: the outcome.
fn progress_result(progress: &Progress, res: &Result<apply::ApplyReport>) {
    progress.event(match res {
        Ok(r) => serde_json::json!({
            "type": "result",
            "result": r.result,
            "id": r.id,
            "exit": 0,
        }),
        Err(e) => serde_json::json!({
            "type": "result",
            "result": "failed",
            "error": format!("{e:#}"),
            "exit": ExitKind::of(e).code(),
        }),
    });
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
    progress_fd: Option<u32>,
) -> Result<u8> {
    let root_path = root.root.clone();
    let progress = Progress::new(json).with_fd(progress_fd)?;
    let res = if target.from_metadata {
        let o = imageupd::agent::from_metadata::FromMetadataOptions {
            root: root.root,
            from: target.from,
            allow_unsigned: target.allow_unsigned,
            allow_downgrade: target.allow_downgrade,
            kernel_policy,
            dry_run,
            ca_file: target.ca_file.clone(),
        };
        imageupd::agent::from_metadata::apply_from_metadata(&o, &progress)
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
            tracker: None,
        };
        apply::run(&opts, &progress)
    };
    if !dry_run {
        write_metrics(&root_path);
    }
    progress_result(&progress, &res);
    let r = res?;
    if json {
        print_json(&r)?;
    } else {
        print!("{}", apply::human_summary(&r));
    }
    Ok(0)
}
