//! Writing a disk's partition table, the last write of a run: an sfdisk
//! script built from the plan (pure, unit-tested), then sfdisk told never
//! to wipe anything (the filesystems are already made) nor to ask the
//! kernel to re-read (no udev needed; the node boots next).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use super::disk::Disk;
use super::plan::DiskPlan;
use super::scheme::Table;

/// The sfdisk script for a disk's plan.
pub fn script(d: &DiskPlan) -> String {
    let ss = d.sector_size;
    let mut s = String::new();
    s.push_str(match d.table {
        Table::Gpt => "label: gpt\n",
        Table::Mbr => "label: dos\n",
    });
    s.push_str(&format!(
        "label-id: {}\nunit: sectors\nsector-size: {ss}\n\n",
        d.disk_id
    ));
    for p in &d.partitions {
        s.push_str(&format!(
            "start={}, size={}, type={}",
            p.start_bytes / ss,
            p.size_bytes / ss,
            p.type_id
        ));
        if let Some(u) = &p.part_uuid {
            s.push_str(&format!(", uuid={u}, name=\"{}\"", p.name));
        }
        if d.table == Table::Mbr && p.role == super::scheme::Role::Esp {
            s.push_str(", bootable");
        }
        s.push('\n');
    }
    s
}

/// Write the table with sfdisk.
pub fn write(disk: &Disk, d: &DiskPlan) -> Result<()> {
    sfdisk(&disk.path, &[], Some(&script(d)))?;
    disk.sync()
}

/// Run sfdisk with `args` on `dev`, feeding it `script` if any: never
/// wiping signatures, never rereading or telling the kernel (callers reread
/// once, when the whole disk is written). Its stderr (and the script) end
/// up in the error.
pub(crate) fn sfdisk(dev: &Path, args: &[&str], script: Option<&str>) -> Result<()> {
    let mut c = Command::new("sfdisk");
    c.args([
        "--quiet",
        "--no-reread",
        "--no-tell-kernel",
        "--wipe",
        "never",
        "--wipe-partitions",
        "never",
    ])
    .args(args)
    .arg(dev)
    .stdin(if script.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c
        .spawn()
        .with_context(|| format!("starting sfdisk on {} (package fdisk)", dev.display()))?;
    if let (Some(text), Some(mut i)) = (script, child.stdin.take()) {
        i.write_all(text.as_bytes())
            .context("writing the sfdisk script")?;
    }
    let out = child.wait_with_output().context("waiting for sfdisk")?;
    if !out.status.success() {
        bail!(
            "sfdisk {}{} failed ({}): {}{}",
            args.iter().map(|a| format!("{a} ")).collect::<String>(),
            dev.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            script
                .map(|t| format!("\nscript:\n{t}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::plan::{compile, Inventory};

    #[test]
    fn gpt_script_in_sectors() {
        let s = crate::provision::scheme::parse(
            "[[disk]]\nname = \"a\"\n[[disk.partition]]\nrole = \"esp\"\nsize = \"64MiB\"\n[[disk.partition]]\nrole = \"root\"\nmin = \"100MiB\"\n",
        )
        .unwrap();
        let inv = Inventory {
            path: "x".into(),
            size_bytes: 1 << 30,
            sector_size: 4096,
        };
        let p = compile(&s, &[inv], "seed").unwrap();
        let t = script(&p.disks[0]);
        assert!(t.starts_with("label: gpt\nlabel-id: "), "{t}");
        assert!(t.contains("sector-size: 4096\n"), "{t}");
        assert!(
            t.contains("start=256, size=16384, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid="),
            "{t}"
        );
        assert!(t.contains("start=16640, size=245248, type=4F68BCE3"), "{t}");
        assert!(t.contains("name=\"root\""), "{t}");
    }
}
