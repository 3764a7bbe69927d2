//! Mounts: /proc/self/mountinfo, and loop-mounted ext4 filesystems.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// (mount point, per-mount options, superblock options) of every mount.
pub fn mountinfo() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                unescape_mountinfo(f.get(4)?),
                f.get(5)?.to_string(),
                f.get(sep + 3).unwrap_or(&"").to_string(),
            ))
        })
        .collect()
}

/// Mount points at or below DIR, in mount order.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mountinfo()
        .into_iter()
        .map(|m| m.0)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Whether the topmost mount at MNT is read-only (per-mount flag), or
/// None when nothing is mounted there.
pub fn mount_readonly(mnt: &Path) -> Option<bool> {
    mountinfo()
        .into_iter()
        .rfind(|m| m.0 == mnt)
        .map(|m| m.1.split(',').any(|o| o == "ro"))
}

/// A loop-mounted ext4 filesystem, unmounted when dropped.
pub struct LoopFs {
    pub img: PathBuf,
    pub mnt: PathBuf,
    mounted: bool,
}

impl LoopFs {
    /// Make an ext4 image of SIZE_MB in DIR (populated from TREE with
    /// `mkfs.ext4 -d` when given) and mount it at DIR/mnt, read-only if RO.
    #[track_caller]
    pub fn create(dir: &Path, size_mb: u64, tree: Option<&Path>, ro: bool) -> LoopFs {
        let img = dir.join("fs.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("create mount point");
        // -m 0: no blocks reserved for root (the tests run as root, and
        // free-space tests need "full" to mean full).
        let mut args: Vec<OsString> = ["-q", "-F", "-t", "ext4", "-I", "256", "-m", "0"]
            .iter()
            .map(OsString::from)
            .collect();
        if let Some(t) = tree {
            args.push("-d".into());
            args.push(t.as_os_str().to_owned());
        }
        args.push(img.as_os_str().to_owned());
        args.push(format!("{size_mb}M").into());
        cmd("mkfs.ext4", args);
        let opts = if ro { "loop,ro" } else { "loop" };
        cmd(
            "mount",
            [
                OsStr::new("-o"),
                OsStr::new(opts),
                img.as_os_str(),
                mnt.as_os_str(),
            ],
        );
        let fs = LoopFs {
            img,
            mnt,
            mounted: true,
        };
        assert_eq!(
            mount_readonly(&fs.mnt),
            Some(ro),
            "mount state of {}",
            fs.mnt.display()
        );
        fs
    }

    /// Remount read-only or read-write.
    #[track_caller]
    pub fn remount(&self, ro: bool) {
        let opts = if ro { "remount,ro" } else { "remount,rw" };
        cmd(
            "mount",
            [OsStr::new("-o"), OsStr::new(opts), self.mnt.as_os_str()],
        );
    }

    /// Read-only state from /proc/self/mountinfo.
    pub fn readonly(&self) -> Option<bool> {
        mount_readonly(&self.mnt)
    }

    /// Unmount now (idempotent).
    pub fn umount(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.mnt)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
            self.mounted = false;
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        self.umount();
    }
}
