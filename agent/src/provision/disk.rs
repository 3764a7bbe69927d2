//! The real disks: what they are (inventory), zeroing their ends, the
//! marker record, loop devices over one partition's byte range (no
//! partition nodes, so no udev and no `losetup -P` that sometimes makes
//! none), and cleaning up after a run that was killed.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use super::plan::{Inventory, MIB};
use super::state::{Marker, MARKER_LEN, MARKER_OFFSET};
use crate::sys::cmd::run;
use crate::sys::error::ExitKind;

/// What a disk is: its canonical path and whether it is a block device.
#[derive(Clone, Debug)]
pub struct Disk {
    /// Canonical path.
    pub path: PathBuf,
    /// A block device (else a disk image file).
    pub block: bool,
    /// Size and sector size.
    pub inv: Inventory,
}

/// Look a disk up: a block device or a regular file (an image file has
/// 512-byte sectors). A missing disk is a usage error.
pub fn inspect(path: &Path) -> Result<Disk> {
    let canon = std::fs::canonicalize(path)
        .with_context(|| format!("disk {} does not exist", path.display()))
        .context(ExitKind::Usage)?;
    let meta = std::fs::metadata(&canon).with_context(|| format!("stat {}", canon.display()))?;
    let block = meta.file_type().is_block_device();
    let (size, ss) = if block {
        let get = |flag: &str| -> Result<u64> {
            let out = run(Command::new("blockdev").arg(flag).arg(&canon))?;
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .with_context(|| format!("blockdev {flag} {}", canon.display()))
        };
        (get("--getsize64")?, get("--getss")?)
    } else if meta.is_file() {
        (meta.len(), 512)
    } else {
        return Err(anyhow!(
            "disk {} is neither a block device nor a disk image file",
            canon.display()
        ))
        .context(ExitKind::Usage);
    };
    Ok(Disk {
        inv: Inventory {
            path: canon.display().to_string(),
            size_bytes: size,
            sector_size: ss,
        },
        path: canon,
        block,
    })
}

impl Disk {
    fn open_rw(&self) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .with_context(|| format!("opening disk {} for writing", self.path.display()))
    }

    /// Zero the first and the last MiB: no old partition table, boot
    /// sector or GPT backup is left to boot from while the job runs.
    pub fn zero_ends(&self) -> Result<()> {
        let mut f = self.open_rw()?;
        let zeros = vec![0u8; MIB as usize];
        let size = self.inv.size_bytes;
        for at in [0, size.saturating_sub(MIB)] {
            f.seek(SeekFrom::Start(at))?;
            let n = MIB.min(size) as usize;
            f.write_all(&zeros[..n])
                .with_context(|| format!("zeroing {} at {at}", self.path.display()))?;
        }
        f.sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))
    }

    /// The marker record, if any.
    pub fn read_marker(&self) -> Result<Option<Marker>> {
        if self.inv.size_bytes < MARKER_OFFSET + MARKER_LEN as u64 {
            return Ok(None);
        }
        let mut f = File::open(&self.path)
            .with_context(|| format!("opening disk {}", self.path.display()))?;
        f.seek(SeekFrom::Start(MARKER_OFFSET))?;
        let mut b = vec![0u8; MARKER_LEN];
        f.read_exact(&mut b)
            .with_context(|| format!("reading the marker of {}", self.path.display()))?;
        Ok(Marker::decode(&b))
    }

    /// Write the marker record and make it durable.
    pub fn write_marker(&self, m: &Marker) -> Result<()> {
        let mut f = self.open_rw()?;
        f.seek(SeekFrom::Start(MARKER_OFFSET))?;
        f.write_all(&m.encode())
            .with_context(|| format!("writing the marker of {}", self.path.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))
    }

    /// Make what was written through loop devices durable on the disk.
    pub fn sync(&self) -> Result<()> {
        self.open_rw()?
            .sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))
    }
}

/// A loop device over a byte range of a disk, detached when dropped.
pub struct Loop {
    /// `/dev/loopN`.
    pub dev: PathBuf,
}

impl Loop {
    /// Attach `[start, start+size)` of the disk, with its sector size.
    pub fn attach(disk: &Disk, start: u64, size: u64) -> Result<Loop> {
        let out = run(Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on", "--offset"])
            .arg(start.to_string())
            .arg("--sizelimit")
            .arg(size.to_string())
            .arg("--sector-size")
            .arg(disk.inv.sector_size.to_string())
            .arg(&disk.path))
        .with_context(|| format!("attaching a loop device to {}", disk.path.display()))?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dev.starts_with("/dev/loop") {
            bail!("losetup printed {dev:?}, not a loop device");
        }
        Ok(Loop {
            dev: PathBuf::from(dev),
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("losetup").arg("-d").arg(&self.dev)) {
            tracing::warn!("detaching {}: {e:#}", self.dev.display());
        }
    }
}

/// One row of `losetup --list --json`.
#[derive(serde::Deserialize)]
struct LoopRow {
    name: String,
    #[serde(rename = "back-file")]
    back_file: Option<String>,
}

/// Detach loop devices backed by this disk that a killed run left behind
/// (after their mounts under `run_dir` are gone). Only loops over this
/// very disk are touched.
pub fn detach_stale(disk: &Disk) -> Result<()> {
    let out =
        run(Command::new("losetup").args(["--list", "--json", "--output", "NAME,BACK-FILE"]))?;
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    #[derive(serde::Deserialize)]
    struct List {
        loopdevices: Vec<LoopRow>,
    }
    let list: List = serde_json::from_slice(&out.stdout).context("parsing losetup --json")?;
    let me = disk.path.display().to_string();
    for row in list.loopdevices {
        if row.back_file.as_deref().map(str::trim) == Some(me.as_str()) {
            tracing::info!("detaching {} left over on {me}", row.name);
            run(Command::new("losetup").arg("-d").arg(&row.name))
                .with_context(|| format!("detaching stale {}", row.name))?;
        }
    }
    Ok(())
}

/// Unmount everything mounted at or below `dir` (deepest first): the
/// mounts of a killed run.
pub fn umount_below(dir: &Path) -> Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        run(Command::new("umount").arg(&p))
            .with_context(|| format!("unmounting stale {}", p.display()))?;
    }
    Ok(())
}

/// Mountinfo escapes blanks and backslashes as octal.
fn unescape_mountinfo(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(
        crate::engine::remount::unescape_bytes(s),
    ))
}

/// Mount a filesystem.
pub fn mount(dev: &Path, fstype: &str, at: &Path) -> Result<()> {
    std::fs::create_dir_all(at).with_context(|| format!("creating {}", at.display()))?;
    run(Command::new("mount").arg("-t").arg(fstype).arg(dev).arg(at))?;
    Ok(())
}

/// Unmount a filesystem.
pub fn umount(at: &Path) -> Result<()> {
    run(Command::new("umount").arg(at))?;
    Ok(())
}
