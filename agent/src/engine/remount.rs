//! Read-only roots: find the mount holding the root, remount it read-write
//! for staging and swap, and read-only again afterwards, also on failure.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// One line of `/proc/self/mountinfo`, the parts we need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount point.
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`/`rw` …).
    pub options: Vec<String>,
    /// Filesystem type.
    pub fstype: String,
}

impl MountInfo {
    /// True when the mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undo the octal escapes mountinfo uses for spaces and the like (bytes:
/// a mount point need not be UTF-8).
pub(crate) fn unescape_bytes(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// [`unescape_bytes`] as text.
fn unescape(s: &str) -> String {
    String::from_utf8_lossy(&unescape_bytes(s)).into_owned()
}

/// Parse mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountInfo {
                mount_point: PathBuf::from(unescape(f.get(4)?)),
                options: f.get(5)?.split(',').map(str::to_string).collect(),
                fstype: f.get(sep + 1)?.to_string(),
            })
        })
        .collect()
}

/// The mount that holds `path` (the last, longest matching mount point).
pub fn mount_of<'a>(mounts: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
}

/// Find the mount holding `root`.
pub fn find(root: &Path) -> Result<Option<MountInfo>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(mount_of(&parse_mountinfo(&text), root).cloned())
}

/// Remount `mount_point` read-write (`rw = true`) or read-only.
pub fn remount(mount_point: &Path, rw: bool) -> Result<()> {
    let opt = if rw { "remount,rw" } else { "remount,ro" };
    crate::sys::cmd::run(
        std::process::Command::new("mount")
            .arg("-o")
            .arg(opt)
            .arg(mount_point),
    )
    .with_context(|| {
        format!(
            "remounting {} {}",
            mount_point.display(),
            if rw { "read-write" } else { "read-only" }
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_picks_longest() {
        let t = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                 40 22 7:0 / /mnt/my\\040root ro,relatime shared:2 - ext4 /dev/loop0 ro\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        let r = mount_of(&m, Path::new("/mnt/my root/etc")).unwrap();
        assert_eq!(r.mount_point, PathBuf::from("/mnt/my root"));
        assert!(r.read_only());
        assert!(!mount_of(&m, Path::new("/srv")).unwrap().read_only());
    }
}
