//! Making a filesystem with the planned UUID and label, and checking that
//! blkid then sees that UUID (fuel-agent 10b0759: a fresh swap signature
//! once read as another filesystem's magic).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::plan::PartPlan;
use super::scheme::Fs;
use crate::sys::cmd::run;

/// The `mount -t` / fstab type of a filesystem.
pub fn fstype(fs: Fs) -> &'static str {
    match fs {
        Fs::Ext4 => "ext4",
        Fs::Xfs => "xfs",
        Fs::Vfat => "vfat",
        Fs::Swap => "swap",
    }
}

/// Make the partition's filesystem on `dev` (no-op without one).
pub fn make(dev: &Path, p: &PartPlan) -> Result<()> {
    let (Some(fs), Some(uuid)) = (p.fs, p.fs_uuid.as_deref()) else {
        return Ok(());
    };
    let mut c = match fs {
        Fs::Ext4 => {
            let mut c = Command::new("mkfs.ext4");
            c.args(["-q", "-F", "-U", uuid]);
            c
        }
        Fs::Xfs => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-f", "-m"]).arg(format!("uuid={uuid}"));
            c
        }
        Fs::Vfat => {
            let mut c = Command::new("mkfs.vfat");
            // The volume id is the UUID without its dash.
            c.arg("-i").arg(uuid.replace('-', ""));
            c
        }
        Fs::Swap => {
            let mut c = Command::new("mkswap");
            c.args(["-U", uuid]);
            c
        }
    };
    if let Some(l) = &p.label {
        c.arg(if fs == Fs::Vfat { "-n" } else { "-L" }).arg(l);
    }
    c.arg(dev);
    run(&mut c).with_context(|| format!("making {} on partition {}", fstype(fs), p.number))?;
    let seen = blkid_uuid(dev)?;
    if !seen.eq_ignore_ascii_case(uuid) {
        bail!(
            "partition {}: blkid sees UUID {seen:?} after mkfs, not {uuid:?}",
            p.number
        );
    }
    Ok(())
}

/// The UUID blkid reads from a device (low-level probe, no cache).
pub fn blkid_uuid(dev: &Path) -> Result<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID"])
        .arg(dev)
        .output()
        .with_context(|| format!("starting blkid on {}", dev.display()))?;
    // blkid exits 2 when it finds nothing: an answer, not an error.
    match out.status.code() {
        Some(0) => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
        Some(2) => Ok(String::new()),
        _ => bail!(
            "blkid -p {} failed ({}): {}",
            dev.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    }
}
