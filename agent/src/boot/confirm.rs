//! After the boot: settle a pending kernel change against the running
//! kernel, and remove module directories nothing needs any more.

use std::collections::BTreeSet;
use std::os::fd::AsFd;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::boot::record::{
    boot_id, epoch_ms, load, save, with_writable, Action, KernelRecord, KernelState,
};
use crate::engine::config::Config;
use crate::engine::lock::Lock;
use crate::format::manifest::{FileType, RelPath};
use crate::fs::fsx;
use crate::fs::preserve::Preserve;
use crate::fs::rootfs::{self, RootFs};

/// Directories (relative to the root) that hold one module directory per
/// kernel release.
pub const MODULE_DIRS: [&str; 2] = ["usr/lib/modules", "lib/modules"];

/// Compare the running kernel (`running`, in the boot `this_boot`) with a
/// pending record and record the outcome. True when the state changed.
pub fn confirm(
    root: &RootFs,
    rec: &mut KernelRecord,
    running: Option<&str>,
    this_boot: Option<&str>,
) -> Result<bool> {
    let now_ms = epoch_ms();
    if running == Some(rec.target.release.as_str()) {
        rec.state = KernelState::Complete;
    } else if rec.boot_id.is_some()
        && this_boot != rec.boot_id.as_deref()
        && matches!(rec.action, Action::Kexec | Action::Reboot)
    {
        rec.state = KernelState::Failed;
        rec.error = Some(format!(
            "after the {} the node runs kernel {}, not the image's {} (with a reboot, does the boot loader's default entry boot the image's kernel?)",
            rec.action.as_str(),
            running.unwrap_or("(unknown)"),
            rec.target.release
        ));
    } else {
        return Ok(false);
    }
    rec.booted_release = running.map(str::to_string);
    rec.confirmed = Some(crate::sys::clock::now_rfc3339());
    rec.request_to_confirm_ms = rec.requested_ms.map(|r| now_ms.saturating_sub(r));
    save(root, rec)?;
    Ok(true)
}

/// What [`confirm_boot`] found and did.
#[derive(Debug, Default, Serialize)]
pub struct BootCheck {
    /// The kernel record after the check.
    pub record: Option<KernelRecord>,
    /// The check changed the record's state (pending → complete/failed).
    pub confirmed: bool,
    /// Module directories removed, relative to the root.
    pub pruned: Vec<String>,
}

/// After a boot: settle a pending kernel change (complete when the target
/// kernel runs, failed when the node booted another one) and remove stale
/// module directories. Only the running system's root has a running
/// kernel; for other roots this reads the record and changes nothing.
pub fn confirm_boot(root: &RootFs) -> Result<BootCheck> {
    let mut out = BootCheck {
        record: load(root)?,
        ..Default::default()
    };
    if !root.is_host_root() {
        return Ok(out);
    }
    let _lock = Lock::acquire(&root.runtime_dir())?;
    if let Some(rec) = out
        .record
        .as_mut()
        .filter(|r| r.state == KernelState::Pending)
    {
        out.confirmed = confirm(
            root,
            rec,
            rootfs::running_release().as_deref(),
            boot_id().as_deref(),
        )?;
        if out.confirmed {
            match rec.state {
                KernelState::Complete => tracing::info!("{}", rec.describe()),
                _ => tracing::error!("{}", rec.describe()),
            }
        }
    }
    if let Some(running) = rootfs::running_release() {
        let cfg = Config::load(&root.path)?;
        out.pruned = prune_stale_modules(root, &cfg, &running)?;
    }
    Ok(out)
}

/// What the current image says about module directories.
struct ImageModules {
    /// Releases whose module directory the image holds.
    releases: BTreeSet<Vec<u8>>,
    /// The image's mtime of each of [`MODULE_DIRS`] it holds, ns.
    dir_mtimes: Vec<(&'static str, i64)>,
}

/// Releases whose module directory the current image holds.
fn image_module_releases(root: &RootFs) -> Result<Option<ImageModules>> {
    let Some(state) = root.state_dir()? else {
        return Ok(None);
    };
    let bytes = match fsx::read_beneath(
        state.as_fd(),
        &RelPath(crate::fs::rootfs::CURRENT_MANIFEST.to_vec()),
    ) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("reading the current image's manifest"),
    };
    let m = crate::format::codec::decode_manifest(&bytes)?;
    let mut out = ImageModules {
        releases: BTreeSet::new(),
        dir_mtimes: Vec::new(),
    };
    for e in m.entries.iter().filter(|e| e.ftype == FileType::Dir) {
        for base in MODULE_DIRS {
            if e.path.as_bytes() == base.as_bytes() {
                out.dir_mtimes.push((base, e.mtime_ns));
            }
            if let Some(rest) = e
                .path
                .as_bytes()
                .strip_prefix(base.as_bytes())
                .and_then(|r| r.strip_prefix(b"/"))
            {
                if !rest.is_empty() && !rest.contains(&b'/') {
                    out.releases.insert(rest.to_vec());
                }
            }
        }
    }
    Ok(Some(out))
}

/// Remove `lib/modules/<release>` directories that the current image does
/// not contain, except the running kernel's and preserved paths, and give
/// the parent directory its mtime from the image again. Nothing is removed
/// when the root has no record of its current image.
pub fn prune_stale_modules(root: &RootFs, cfg: &Config, running: &str) -> Result<Vec<String>> {
    let Some(keep) = image_module_releases(root)? else {
        return Ok(Vec::new());
    };
    let preserve = Preserve::new(&cfg.preserve).map_err(anyhow::Error::msg)?;
    let mut stale: Vec<(&str, Vec<u8>)> = Vec::new();
    for base in MODULE_DIRS {
        // `lib` is a symlink to `usr/lib` on merged-/usr systems; opening
        // never follows it, so each directory is visited once.
        let Ok(dir) = fsx::open_dir_beneath(root.fd(), &RelPath(base.as_bytes().to_vec())) else {
            continue;
        };
        for name in fsx::read_dir_names(dir.as_fd()).with_context(|| format!("listing {base}"))? {
            let rel = RelPath([base.as_bytes(), b"/", &name].concat());
            let is_dir = fsx::stat_at(dir.as_fd(), &name).is_ok_and(|s| s.ftype == FileType::Dir);
            if is_dir
                && name != running.as_bytes()
                && !keep.releases.contains(&name)
                && !preserve.matches(&rel)
            {
                stale.push((base, name));
            }
        }
    }
    if stale.is_empty() {
        return Ok(Vec::new());
    }
    with_writable(root, || {
        let mut removed = Vec::new();
        for (base, name) in &stale {
            let dir = fsx::open_dir_beneath(root.fd(), &RelPath(base.as_bytes().to_vec()))
                .with_context(|| format!("opening {base}"))?;
            let shown = format!("{base}/{}", String::from_utf8_lossy(name));
            fsx::remove_tree_at(dir.as_fd(), name, root.dev)
                .with_context(|| format!("removing stale modules {shown}"))?;
            tracing::info!("removed {shown}: neither the current image nor the running kernel {running} uses it");
            removed.push(shown);
            if let Some((_, mtime)) = keep.dir_mtimes.iter().find(|(b, _)| b == base) {
                fsx::set_mtime_fd(dir.as_fd(), *mtime)
                    .with_context(|| format!("restoring the mtime of {base}"))?;
            }
        }
        Ok(removed)
    })
}
