//! Writing files into a fresh vfat filesystem with mtools, straight on
//! its loop device: no mount, so nothing to clean up if the run is killed.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::sys::cmd::run;

/// mtools command on the device `dev` (checks of the geometry are off:
/// a loop device has none).
fn mtool(tool: &str, dev: &Path) -> Command {
    let mut c = Command::new(tool);
    c.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(dev);
    c
}

/// Write `files` (relative paths, bytes) onto the vfat filesystem on `dev`,
/// making their directories; existing files are overwritten.
pub fn write_files(dev: &Path, files: &[(String, Vec<u8>)]) -> Result<()> {
    let tmp = tempfile::tempdir().context("temporary directory for the vfat files")?;
    let mut dirs = std::collections::BTreeSet::new();
    for (rel, _) in files {
        let mut acc = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for c in &parts[..parts.len() - 1] {
            acc = if acc.is_empty() {
                c.to_string()
            } else {
                format!("{acc}/{c}")
            };
            dirs.insert(acc.clone());
        }
    }
    for d in &dirs {
        // mmd fails on an existing directory: only make the missing ones.
        let exists = mtool("mdir", dev).arg("-b").arg(format!("::/{d}")).output();
        if !matches!(exists, Ok(o) if o.status.success()) {
            run(mtool("mmd", dev).arg(format!("::/{d}")))
                .with_context(|| format!("making {d} on {}", dev.display()))?;
        }
    }
    for (n, (rel, bytes)) in files.iter().enumerate() {
        let local = tmp.path().join(format!("f{n}"));
        std::fs::write(&local, bytes).with_context(|| format!("writing {}", local.display()))?;
        run(mtool("mcopy", dev)
            .arg("-o")
            .arg(&local)
            .arg(format!("::/{rel}")))
        .with_context(|| format!("copying {rel} to {}", dev.display()))?;
    }
    Ok(())
}
