//! `--configdrive` with `--whole-disk`: a `config-2` partition added at the
//! end of the disk, after the image, without writing the first MiB early.
//!
//! The image's table is edited on a sparse scratch file of the disk's size
//! holding only the held first MiB and the image's backup GPT (at the
//! image's end): `sfdisk --relocate gpt-bak-std` moves the backup header to
//! the disk's end (what `sgdisk -e` does; the protective MBR is resized
//! too), then `sfdisk --append` adds the partition. The configdrive's
//! filesystem is made and filled through a loop device over its byte range
//! of the real disk ([`crate::provision::mkfs`], [`crate::provision::media`],
//! as the scheme path does), the new backup GPT is written at the disk's
//! end, and the new first MiB replaces the held one: it is still written
//! last, after everything else is synced.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::provision::disk::{Disk, Loop};
use crate::provision::plan::{derive_uuid, PartPlan, CONFIG2_LABEL, GPT_ENTRIES_BYTES, MIB};
use crate::provision::scheme::{Fs, Role};
use crate::provision::table::sfdisk;
use crate::sys::cmd::run;

/// Size of the added config-2 partition, bytes (the scheme's default).
pub const DRIVE_BYTES: u64 = 64 * MIB;
/// Signature of a GPT header, at the start of the disk's second sector.
const GPT_SIG: &[u8; 8] = b"EFI PART";
/// GPT type of the partition: Linux filesystem data.
const LINUX_FS_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// Bytes of a backup GPT (entries and header) for `ss`-byte sectors.
fn gpt_tail(ss: u64) -> u64 {
    (1 + GPT_ENTRIES_BYTES.div_ceil(ss)) * ss
}

/// Where the partition goes on a disk of `disk_bytes` with `ss`-byte
/// sectors behind an image of `image_bytes`: the last [`DRIVE_BYTES`]
/// aligned to 1 MiB before the backup GPT, `(start, size)` in bytes. Pure.
pub fn span(disk_bytes: u64, ss: u64, image_bytes: u64) -> Result<(u64, u64), String> {
    let end = disk_bytes.saturating_sub(gpt_tail(ss)) / MIB * MIB;
    let start = end.saturating_sub(DRIVE_BYTES);
    if start < image_bytes.div_ceil(MIB) * MIB || end < DRIVE_BYTES {
        return Err(format!(
            "the disk ({disk_bytes} bytes) has no room for a {} MiB configdrive after the image ({image_bytes} bytes): it needs at least {} bytes",
            DRIVE_BYTES / MIB,
            image_bytes.div_ceil(MIB) * MIB + DRIVE_BYTES + MIB
        ));
    }
    Ok((start, DRIVE_BYTES))
}

/// Check that the image's first bytes hold a GPT for the disk's sector
/// size (an MBR image has no room for a partition the firmware ignores,
/// and a GPT for other sectors would be unreadable there). Pure.
pub fn check_head(head: &[u8], ss: u64) -> Result<(), String> {
    let has = |s: u64| {
        let s = s as usize;
        head.get(s..s + GPT_SIG.len()) == Some(&GPT_SIG[..])
    };
    if has(ss) {
        return Ok(());
    }
    match [512u64, 4096].into_iter().find(|&s| s != ss && has(s)) {
        Some(other) => Err(format!(
            "the image's GPT is for {other}-byte sectors but the disk has {ss}-byte sectors"
        )),
        None => Err("the image has no GPT (an MBR image?): --configdrive needs a GPT image".into()),
    }
}

/// The partition entry (and filesystem) of the drive, numbered `number`.
fn part(number: usize, start: u64, size: u64, seed: &str) -> PartPlan {
    let fs_uuid = derive_uuid(seed, "whole-disk/configdrive/fs");
    PartPlan {
        number,
        role: Role::Configdrive,
        start_bytes: start,
        size_bytes: size,
        type_id: LINUX_FS_TYPE.into(),
        part_uuid: Some(derive_uuid(seed, "whole-disk/configdrive/part")),
        name: CONFIG2_LABEL.into(),
        fs: Some(Fs::Vfat),
        fs_uuid: Some(format!("{}-{}", &fs_uuid[0..4], &fs_uuid[4..8]).to_uppercase()),
        label: Some(CONFIG2_LABEL.into()),
        mount: None,
    }
}

/// Add the drive holding `files` behind an image of `image_bytes` on
/// `disk`, whose image first MiB is `head` (held, not yet written); UUIDs
/// from `seed`. Writes the drive and the new backup GPT to the disk and
/// syncs; returns the new first MiB (to be written last) and the entry.
pub fn add(
    disk: &Disk,
    head: &[u8],
    image_bytes: u64,
    files: &[(String, Vec<u8>)],
    seed: &str,
) -> Result<(Vec<u8>, PartPlan)> {
    let ss = disk.inv.sector_size;
    let size = disk.inv.size_bytes;
    let (start, len) = span(size, ss, image_bytes).map_err(anyhow::Error::msg)?;
    let tmp = tempfile::tempdir().context("scratch space for the partition table")?;
    let scratch = tmp.path().join("table.img");
    let tail = gpt_tail(ss);
    if image_bytes < 2 * tail {
        bail!("the image ({image_bytes} bytes) is too small to hold a GPT");
    }
    {
        let s = File::create(&scratch).context("creating the scratch table")?;
        s.set_len(size)?;
        s.write_all_at(head, 0)?;
        let mut old = vec![0u8; tail as usize];
        let f = File::open(&disk.path)?;
        f.read_exact_at(&mut old, image_bytes - tail)
            .context("reading the image's backup GPT")?;
        s.write_all_at(&old, image_bytes - tail)?;
    }
    sfdisk(&scratch, &["--relocate", "gpt-bak-std"], None)
        .context("moving the image's backup GPT to the end of the disk")?;
    let count = partitions(&scratch)?;
    let p = part(count + 1, start, len, seed);
    let line = format!(
        "start={}, size={}, type={}, uuid={}, name=\"{}\"\n",
        start / ss,
        len / ss,
        p.type_id,
        p.part_uuid.as_deref().unwrap_or_default(),
        p.name
    );
    sfdisk(&scratch, &["--append"], Some(&line)).context("adding the config-2 partition")?;
    let l = Loop::attach(disk, start, len)?;
    crate::provision::mkfs::make(&l.dev, &p)?;
    crate::provision::media::write_files(&l.dev, files)?;
    drop(l);
    let s = File::open(&scratch)?;
    let mut new_head = vec![0u8; head.len()];
    s.read_exact_at(&mut new_head, 0)?;
    let mut new_tail = vec![0u8; tail as usize];
    s.read_exact_at(&mut new_tail, size - tail)?;
    let d = OpenOptions::new().write(true).open(&disk.path)?;
    d.write_all_at(&new_tail, size - tail)
        .context("writing the backup GPT at the end of the disk")?;
    d.sync_all()
        .with_context(|| format!("syncing {}", disk.path.display()))?;
    Ok((new_head, p))
}

/// How many partitions the table in `file` has.
fn partitions(file: &Path) -> Result<usize> {
    let out = run(Command::new("sfdisk").arg("--json").arg(file))?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `sfdisk --json` output")?;
    v.pointer("/partitiontable/partitions")
        .and_then(|p| p.as_array())
        .map(Vec::len)
        .ok_or_else(|| anyhow!("sfdisk reads no partition table in the image"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_is_the_aligned_end_and_needs_room() {
        // 1 GiB disk, 512-byte sectors: the last MiB holds the backup GPT.
        assert_eq!(span(1 << 30, 512, 512 * MIB), Ok((959 * MIB, DRIVE_BYTES)));
        assert_eq!(span(1 << 30, 4096, 512 * MIB), Ok((959 * MIB, DRIVE_BYTES)));
        // Exactly enough room, and one MiB too little.
        assert!(span(1 << 30, 512, 959 * MIB).is_ok());
        assert!(span(1 << 30, 512, 959 * MIB + 1).is_err());
        assert!(span(32 * MIB, 512, 0).is_err());
    }

    #[test]
    fn head_must_hold_a_gpt_for_the_disk_sectors() {
        let mut h = vec![0u8; MIB as usize];
        assert!(check_head(&h, 512).unwrap_err().contains("no GPT"));
        h[512..520].copy_from_slice(GPT_SIG);
        assert_eq!(check_head(&h, 512), Ok(()));
        assert!(check_head(&h, 4096)
            .unwrap_err()
            .contains("512-byte sectors"));
        assert!(check_head(&h[..100], 512).is_err());
    }
}
