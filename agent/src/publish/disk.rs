//! Disk images as publish sources (SPEC §2, §9): `.raw` and `.qcow2` files
//! as diskimage-builder makes them.
//!
//! Publishing a disk image does two things:
//!
//! 1. **The tree.** The root filesystem inside the image is found and
//!    ingested like a directory: a qcow2 is first converted to a sparse raw
//!    file in the store's scratch space (`qemu-img convert`, which refuses
//!    nothing but is never given an image with a backing or external data
//!    file), the partition table (GPT or MBR, read by `sfdisk --json`; no
//!    table means a whole-disk filesystem) is searched for ext2/3/4 and xfs
//!    filesystems, each is attached read-only to a loop device at its offset
//!    (`losetup --read-only --offset --sizelimit`) and mounted read-only
//!    without journal replay (`ro,noload` for ext4, `ro,norecovery` for
//!    xfs), and the largest one holding `/etc` and `/usr` is the root. Mounts
//!    and loop devices are released on every path, errors included
//!    ([`MountedRoot`] is a drop guard).
//! 2. **The artifact.** The image file itself is kept for provisioning
//!    (Ironic's agent downloads it whole):
//!
//!    ```text
//!    STORE/disks/<id>/<basename>     the image, byte for byte
//!    STORE/disks/<id>/SHA256SUMS     "<sha256>  <basename>\n" (sha256sum's format, which IPA reads)
//!    ```
//!
//!    The file is copied into the store first and everything else (hash,
//!    conversion, mount) works on that copy, so the tree published and the
//!    bytes served are the same image even if the source changes meanwhile.
//!
//! External commands' stderr ends up in the errors ([`crate::sys::cmd::run`]).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;

use crate::format::manifest::Digest;
use crate::fs::store::{self, DiskEntry, DiskFormat, Store};
use crate::sys::cmd;
use crate::sys::error::ExitKind;

pub use crate::format::manifest::{DISKS_DIR, SHA256SUMS};
/// Bytes at the start of a qcow2 file.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Offset of the ext2/3/4 superblock magic (superblock at 1024 + 56), bytes.
const EXT_MAGIC_OFFSET: u64 = 1024 + 56;
/// The ext2/3/4 superblock magic, little-endian.
const EXT_MAGIC: [u8; 2] = [0x53, 0xef];
/// The xfs superblock magic at offset 0.
const XFS_MAGIC: &[u8; 4] = b"XFSB";
/// Copy and hash buffer, bytes.
const BUF: usize = 1 << 20;

/// A filesystem type this module can mount as an image root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsType {
    /// ext2, ext3 or ext4 (mounted as ext4).
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    fn mount_args(self) -> (&'static str, &'static str) {
        match self {
            FsType::Ext4 => ("ext4", "ro,noload"),
            FsType::Xfs => ("xfs", "ro,norecovery"),
        }
    }
}

/// True when `name` looks like a disk image by its extension.
pub fn is_disk_name(name: &str) -> bool {
    [".raw", ".qcow2", ".img"].iter().any(|s| name.ends_with(s))
}

/// Decide the format by content: the qcow2 magic, else raw.
pub fn detect_format(path: &Path) -> Result<DiskFormat> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut m = [0u8; 4];
    match f.read_exact(&mut m) {
        Ok(()) if &m == QCOW2_MAGIC => Ok(DiskFormat::Qcow2),
        Ok(()) => Ok(DiskFormat::Raw),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            bail!("{} is too small to be a disk image", path.display())
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Check a published basename: something a URL path and `SHA256SUMS` can
/// carry unambiguously.
fn check_name(name: &str) -> Result<()> {
    crate::format::manifest::check_disk_name(name)
        .map_err(|e| anyhow!("{e}; it cannot be published"))
}

/// A disk image copied into the store's scratch space, not yet published.
pub struct StagedDisk {
    dir: tempfile::TempDir,
    /// The copy.
    pub path: PathBuf,
    /// Published file name.
    pub name: String,
    /// Container format (by content).
    pub format: DiskFormat,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the copy.
    pub sha256: Digest,
}

/// Copy `source` into the store's scratch space and hash the copy; check
/// that a qcow2 is self-contained.
pub fn stage(st: &Store, source: &Path) -> Result<StagedDisk> {
    let name = source
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{} has no usable file name", source.display()))?
        .to_string();
    check_name(&name).context(ExitKind::Usage)?;
    let format = detect_format(source).context(ExitKind::Source)?;
    let dir = tempfile::Builder::new()
        .prefix("disk-")
        .tempdir_in(st.tmp_dir()?)
        .context("creating scratch space for the disk image")?;
    let path = dir.path().join(&name);
    // A reflink where the filesystem can, else a copy that keeps holes
    // (raw images are mostly sparse).
    cmd::run(
        Command::new("cp")
            .args(["--reflink=auto", "--sparse=always", "--"])
            .arg(source)
            .arg(&path),
    )
    .with_context(|| {
        format!(
            "copying {} into the store's scratch space {}",
            source.display(),
            dir.path().display()
        )
    })?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    let (sha256, size) = hash_file(&path)?;
    if format == DiskFormat::Qcow2 {
        check_qcow2(&path).context(ExitKind::Untrusted)?;
    }
    Ok(StagedDisk {
        dir,
        path,
        name,
        format,
        size,
        sha256,
    })
}

fn hash_file(path: &Path) -> Result<(Digest, u64)> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    crate::format::stream::digest_of(io::BufReader::with_capacity(BUF, f))
        .with_context(|| format!("hashing {}", path.display()))
}

/// `qemu-img info`: refuse images that would make qemu read other files.
fn check_qcow2(path: &Path) -> Result<()> {
    let out = cmd::run(
        Command::new("qemu-img")
            .args(["info", "-f", "qcow2", "--output=json"])
            .arg(path),
    )
    .context("inspecting the qcow2 image (package qemu-utils)")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `qemu-img info` output")?;
    if let Some(b) = v.get("backing-filename") {
        bail!(
            "{} has a backing file ({b}); publish a self-contained image (qemu-img convert)",
            path.display()
        );
    }
    if let Some(d) = v.pointer("/format-specific/data/data-file") {
        bail!(
            "{} has an external data file ({d}); publish a self-contained image",
            path.display()
        );
    }
    Ok(())
}

impl StagedDisk {
    /// The signed manifest's record of this image ([`crate::format::manifest::DiskArtifact`]).
    pub fn artifact(&self) -> crate::format::manifest::DiskArtifact {
        crate::format::manifest::DiskArtifact {
            file: self.name.clone(),
            format: self.format,
            size: self.size,
            sha256: self.sha256,
        }
    }

    /// Move the image to `disks/<id>/` and write `SHA256SUMS` beside it.
    /// Called just before the manifest is written, so a published image's
    /// disk is always complete.
    pub fn install(self, st: &Store, id: &str) -> Result<DiskEntry> {
        let rel_dir = format!("{DISKS_DIR}/{id}");
        let dir = st.path().join(&rel_dir);
        if dir.exists() {
            bail!("{} already exists; image ids are immutable", dir.display());
        }
        // Assemble in scratch, then one rename makes it appear whole.
        let sums = format!("{}  {}\n", self.sha256.to_hex(), self.name);
        store::write_atomic(&self.dir.path().join(SHA256SUMS), sums.as_bytes())?;
        File::open(&self.path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", self.path.display()))?;
        fs::create_dir_all(st.path().join(DISKS_DIR))?;
        let tmp = self.dir.keep();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e).with_context(|| format!("moving the disk image to {}", dir.display()));
        }
        Ok(DiskEntry {
            path: format!("{rel_dir}/{}", self.name),
            sha256sums: format!("{rel_dir}/{SHA256SUMS}"),
            name: self.name,
            format: self.format,
            size: self.size,
            sha256: self.sha256.to_hex(),
        })
    }
}

/// One filesystem candidate inside a raw image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Partition number (1-based), 0 for a whole-disk filesystem.
    pub number: u32,
    /// Offset in bytes.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Filesystem found by its magic.
    pub fs: FsType,
}

/// The filesystem type at `offset` of `f`, by superblock magic.
pub fn fs_at(f: &mut File, offset: u64) -> io::Result<Option<FsType>> {
    let mut m = [0u8; 4];
    f.seek(SeekFrom::Start(offset))?;
    if f.read_exact(&mut m).is_ok() && &m == XFS_MAGIC {
        return Ok(Some(FsType::Xfs));
    }
    let mut e = [0u8; 2];
    f.seek(SeekFrom::Start(offset + EXT_MAGIC_OFFSET))?;
    if f.read_exact(&mut e).is_ok() && e == EXT_MAGIC {
        return Ok(Some(FsType::Ext4));
    }
    Ok(None)
}

#[derive(Deserialize)]
struct SfdiskOut {
    partitiontable: SfdiskTable,
}

#[derive(Deserialize)]
struct SfdiskTable {
    #[serde(default)]
    sectorsize: Option<u64>,
    #[serde(default)]
    partitions: Vec<SfdiskPart>,
}

#[derive(Deserialize)]
struct SfdiskPart {
    node: String,
    start: u64,
    size: u64,
}

/// Parse `sfdisk --json` output into (number, offset, size) in bytes.
pub fn parse_sfdisk(json: &[u8]) -> Result<Vec<(u32, u64, u64)>> {
    let t: SfdiskOut = serde_json::from_slice(json).context("parsing `sfdisk --json` output")?;
    let ss = t.partitiontable.sectorsize.unwrap_or(512);
    Ok(t.partitiontable
        .partitions
        .iter()
        .map(|p| {
            let num = p
                .node
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            (num, p.start * ss, p.size * ss)
        })
        .collect())
}

/// Every ext/xfs filesystem in a raw image, largest first.
pub fn candidates(raw: &Path) -> Result<Vec<Candidate>> {
    let mut f = File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let len = f.metadata()?.len();
    if let Some(fs) = fs_at(&mut f, 0)? {
        return Ok(vec![Candidate {
            number: 0,
            offset: 0,
            size: len,
            fs,
        }]);
    }
    let out = cmd::run(Command::new("sfdisk").arg("--json").arg(raw)).with_context(|| {
        format!(
            "{} holds neither a filesystem nor a partition table sfdisk reads",
            raw.display()
        )
    })?;
    let mut v = Vec::new();
    for (number, offset, size) in parse_sfdisk(&out.stdout)? {
        if size == 0 || offset.saturating_add(size) > len {
            continue;
        }
        if let Some(fs) = fs_at(&mut f, offset)? {
            v.push(Candidate {
                number,
                offset,
                size,
                fs,
            });
        }
    }
    v.sort_by(|a, b| b.size.cmp(&a.size).then(a.number.cmp(&b.number)));
    Ok(v)
}

/// A read-only loop device, detached when dropped.
struct LoopDev {
    dev: Option<String>,
}

impl LoopDev {
    fn attach(file: &Path, offset: u64, size: u64) -> Result<LoopDev> {
        let out = cmd::run(
            Command::new("losetup")
                .args(["--find", "--show", "--read-only"])
                .arg(format!("--offset={offset}"))
                .arg(format!("--sizelimit={size}"))
                .arg(file),
        )
        .context("attaching a loop device (are loop devices available?)")?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dev.starts_with("/dev/") {
            bail!("losetup printed {dev:?} instead of a device");
        }
        Ok(LoopDev { dev: Some(dev) })
    }

    fn path(&self) -> &str {
        self.dev.as_deref().unwrap_or("")
    }

    fn detach(&mut self) -> Result<()> {
        if let Some(d) = self.dev.take() {
            cmd::run(Command::new("losetup").arg("--detach").arg(&d))
                .with_context(|| format!("detaching {d}"))?;
        }
        Ok(())
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            tracing::warn!("{e:#}");
        }
    }
}

/// A read-only mount, unmounted (lazily if busy) when dropped.
struct Mount {
    at: Option<PathBuf>,
}

impl Mount {
    fn new(dev: &str, fs: FsType, at: &Path) -> Result<Mount> {
        let (t, o) = fs.mount_args();
        cmd::run(
            Command::new("mount")
                .args(["-t", t, "-o", o])
                .arg(dev)
                .arg(at),
        )
        .with_context(|| format!("mounting {dev} ({t}) read-only"))?;
        Ok(Mount {
            at: Some(at.to_path_buf()),
        })
    }

    fn unmount(&mut self) -> Result<()> {
        if let Some(at) = self.at.take() {
            if let Err(e) = cmd::run(Command::new("umount").arg(&at)) {
                let _ = cmd::run(Command::new("umount").arg("--lazy").arg(&at));
                return Err(e).with_context(|| format!("unmounting {}", at.display()));
            }
        }
        Ok(())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Err(e) = self.unmount() {
            tracing::warn!("{e:#}");
        }
    }
}

/// The root filesystem of a disk image, mounted read-only. Dropping it
/// unmounts, detaches and removes the scratch files; [`MountedRoot::close`]
/// does the same and reports failures.
pub struct MountedRoot {
    // Fields drop in this order: the mount, then the loop device, then the
    // scratch directory (mount point and converted raw file).
    mount: Mount,
    loopdev: LoopDev,
    _scratch: tempfile::TempDir,
    mnt: PathBuf,
    /// The filesystem chosen.
    pub chosen: Candidate,
}

impl MountedRoot {
    /// Where the tree is.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Unmount and detach now, reporting failures.
    pub fn close(mut self) -> Result<()> {
        self.mount.unmount()?;
        self.loopdev.detach()?;
        Ok(())
    }
}

/// Find and mount the root filesystem of the staged disk `disk`; scratch
/// space (mount point, a qcow2's raw conversion) goes below `tmp`.
pub fn mount_root(disk: &Path, format: DiskFormat, tmp: &Path) -> Result<MountedRoot> {
    let scratch = tempfile::Builder::new()
        .prefix("diskroot-")
        .tempdir_in(tmp)
        .context("creating scratch space for the disk's root filesystem")?;
    let raw = match format {
        DiskFormat::Raw => disk.to_path_buf(),
        DiskFormat::Qcow2 => {
            let raw = scratch.path().join("converted.raw");
            cmd::run(
                Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "raw"])
                    .arg(disk)
                    .arg(&raw),
            )
            .with_context(|| format!("converting {} to raw", disk.display()))?;
            raw
        }
    };
    let found = candidates(&raw)?;
    if found.is_empty() {
        bail!("no ext2/3/4 or xfs filesystem found in {}", disk.display());
    }
    let mnt = scratch.path().join("mnt");
    fs::create_dir(&mnt)?;
    let mut tried = Vec::new();
    for c in found {
        let mut loopdev = LoopDev::attach(&raw, c.offset, c.size)?;
        let mut mount = match Mount::new(loopdev.path(), c.fs, &mnt) {
            Ok(m) => m,
            Err(e) => {
                tried.push(format!("partition {} ({:?}): {e:#}", c.number, c.fs));
                loopdev.detach()?;
                continue;
            }
        };
        if mnt.join("etc").is_dir() && mnt.join("usr").is_dir() {
            return Ok(MountedRoot {
                mount,
                loopdev,
                _scratch: scratch,
                mnt,
                chosen: c,
            });
        }
        tried.push(format!(
            "partition {} ({:?}, {} bytes): no /etc and /usr",
            c.number, c.fs, c.size
        ));
        mount.unmount()?;
        loopdev.detach()?;
    }
    Err(anyhow!(
        "no root filesystem (with /etc and /usr) in {}: {}",
        disk.display(),
        tried.join("; ")
    ))
}

/// Parse a `SHA256SUMS` file: (hash, basename) per line; a leading `*`
/// (binary mode) is accepted as sha256sum writes it.
pub fn parse_sha256sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (h, n) = l.split_once(char::is_whitespace)?;
            let n = n.trim_start().trim_start_matches('*');
            (h.len() == 64 && !n.is_empty()).then(|| (h.to_string(), n.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["disk.qcow2", "overcloud-full.raw", "a_b-1.2+3~x.img"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden.raw",
            "SHA256SUMS",
            "a b.raw",
            "a/b.raw",
            "ü.raw",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(is_disk_name("x.qcow2") && is_disk_name("x.raw") && !is_disk_name("x.tar"));
    }

    #[test]
    fn sfdisk_json() {
        let j = br#"{"partitiontable":{"label":"gpt","id":"X","device":"d.raw","unit":"sectors",
            "firstlba":34,"lastlba":409566,"sectorsize":512,"partitions":[
            {"node":"d.raw1","start":2048,"size":2048,"type":"21686148-6449-6E6F-744E-656564454649"},
            {"node":"d.raw12","start":4096,"size":405471,"type":"0FC63DAF-8483-4772-8E79-3D69D8477DE4"}]}}"#;
        assert_eq!(
            parse_sfdisk(j).expect("parse"),
            vec![(1, 1 << 20, 1 << 20), (12, 4096 * 512, 405471 * 512)]
        );
    }

    #[test]
    fn fs_magic() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("x");
        let mut data = vec![0u8; 8192];
        data[4096 + 1024 + 56] = 0x53;
        data[4096 + 1024 + 57] = 0xef;
        data[..4].copy_from_slice(b"XFSB");
        fs::write(&p, &data).expect("write");
        let mut f = File::open(&p).expect("open");
        assert_eq!(fs_at(&mut f, 0).expect("read"), Some(FsType::Xfs));
        assert_eq!(fs_at(&mut f, 4096).expect("read"), Some(FsType::Ext4));
        assert_eq!(fs_at(&mut f, 512).expect("read"), None);
        assert_eq!(fs_at(&mut f, 100_000).expect("read"), None);
    }

    #[test]
    fn sums() {
        let h = "a".repeat(64);
        assert_eq!(
            parse_sha256sums(&format!("{h}  disk.raw\n{h} *b.qcow2\nbad\n")),
            vec![(h.clone(), "disk.raw".into()), (h, "b.qcow2".into())]
        );
    }
}
