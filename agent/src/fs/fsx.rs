//! Filesystem primitives that never follow a symlink and never leave the
//! root's filesystem.
//!
//! Everything below the root is reached through directory file descriptors
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_XDEV)`, then addressed by a single name relative to that
//! descriptor. A symlink planted anywhere in the root therefore cannot
//! redirect a read or a write, and another mount is never entered.
//!
//! Extended attributes have no `*at` system calls; they are reached through
//! `/proc/self/fd/<dirfd>/<name>` with the non-following `l*xattr` calls,
//! which pins the directory and resolves only the final name.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags, Timespec, Timestamps};

use crate::format::manifest::{FileType, RelPath, Xattrs};

mod xattrs;
pub use xattrs::{read_xattrs, set_xattrs_fd, sync_xattrs};

/// The attributes of one filesystem object that imageupd cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Object type (never `Hardlink`: that is a manifest-level notion).
    pub ftype: FileType,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time in ns since the epoch.
    pub mtime_ns: i64,
    /// Status-change time in ns since the epoch (moves on every change of
    /// content, xattrs, mode, owner or links; see [`crate::fs::stamps`]).
    pub ctime_ns: i64,
    /// Device of the filesystem holding the object.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Hard link count.
    pub nlink: u64,
    /// Device number for device nodes.
    pub rdev: u64,
}

impl Stat {
    fn from_raw(st: &rfs::Stat) -> Self {
        let raw_mode = st.st_mode;
        let ftype = match rfs::FileType::from_raw_mode(raw_mode) {
            rfs::FileType::RegularFile => FileType::File,
            rfs::FileType::Directory => FileType::Dir,
            rfs::FileType::Symlink => FileType::Symlink,
            rfs::FileType::CharacterDevice => FileType::Char,
            rfs::FileType::BlockDevice => FileType::Block,
            rfs::FileType::Fifo => FileType::Fifo,
            rfs::FileType::Socket => FileType::Socket,
            rfs::FileType::Unknown => FileType::File,
        };
        Stat {
            ftype,
            mode: raw_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            mtime_ns: st
                .st_mtime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec as i64),
            ctime_ns: st
                .st_ctime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_ctime_nsec as i64),
            dev: st.st_dev,
            ino: st.st_ino,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
        }
    }
}

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH
        | ResolveFlags::NO_SYMLINKS
        | ResolveFlags::NO_XDEV
        | ResolveFlags::NO_MAGICLINKS
}

/// Open a host directory (the root itself, a store, a source tree).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rfs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Open a directory below `root` without following any symlink or crossing
/// a mount.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &RelPath) -> io::Result<OwnedFd> {
    let p: &OsStr = if rel.is_root() {
        OsStr::new(".")
    } else {
        rel.as_os_str()
    };
    Ok(rfs::openat2(
        root,
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        beneath(),
    )?)
}

/// Open a regular file below `root` for reading, never through a symlink.
pub fn open_file_beneath(root: BorrowedFd<'_>, rel: &RelPath) -> io::Result<File> {
    let fd = rfs::openat2(
        root,
        rel.as_os_str(),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
        beneath(),
    )?;
    let f = File::from(fd);
    if !f.metadata()?.is_file() {
        return Err(io::Error::other(format!("{rel} is not a regular file")));
    }
    Ok(f)
}

/// `lstat` of one name in a directory.
pub fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Stat> {
    let st = rfs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(Stat::from_raw(&st))
}

/// `fstat` of an open descriptor.
pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    Ok(Stat::from_raw(&rfs::fstat(fd)?))
}

/// Sorted names of a directory, without `.` and `..`. Reads the
/// descriptor itself from its start (no duplicate descriptor per directory:
/// a walk lists thousands).
pub fn read_dir_names(dir: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    use std::mem::MaybeUninit;
    rustix::fs::seek(dir, rustix::fs::SeekFrom::Start(0))?;
    let mut buf = [MaybeUninit::<u8>::uninit(); 16 * 1024];
    let mut d = rfs::RawDir::new(dir, &mut buf);
    let mut names = Vec::new();
    while let Some(ent) = d.next() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push(n.to_vec());
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// Read a whole small file directly in `dir`, refusing more than `limit`
/// bytes and never following a symlink.
pub fn read_at_limited(dir: BorrowedFd<'_>, name: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let fd = rfs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let mut v = Vec::new();
    File::from(fd).take(limit as u64 + 1).read_to_end(&mut v)?;
    if v.len() > limit {
        return Err(io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(v)
}

/// Target of a symlink.
pub fn readlink_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<u8>> {
    Ok(rfs::readlinkat(dir, OsStr::from_bytes(name), Vec::new())?.into_bytes())
}

fn with_what(e: io::Error, what: &str, name: &[u8]) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", String::from_utf8_lossy(name)),
    )
}

fn timestamps(mtime_ns: i64) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000),
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
        },
    }
}

/// Owner, mode and xattrs of an object in place, in the order the kernel
/// requires: `chown` clears setuid bits and `security.capability`, so it goes
/// first. The mtime is separate ([`set_mtime_at`]) because directories get
/// theirs last.
pub struct Meta<'a> {
    /// Object type, which decides whether mode can be set.
    pub ftype: FileType,
    /// Permission bits.
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// The wanted xattrs.
    pub xattrs: &'a Xattrs,
}

/// Apply [`Meta`] to `name` in `dir`, given its current xattrs.
pub fn set_meta_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    meta: &Meta<'_>,
    have_xattrs: &Xattrs,
) -> io::Result<()> {
    let n = OsStr::from_bytes(name);
    rfs::chownat(
        dir,
        n,
        Some(rfs::Uid::from_raw(meta.uid)),
        Some(rfs::Gid::from_raw(meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("chown: {e}")))?;
    if meta.ftype != FileType::Symlink {
        rfs::chmodat(dir, n, Mode::from_raw_mode(meta.mode), AtFlags::empty())
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("chmod: {e}")))?;
    }
    // chown dropped security.capability; compare against an empty set for it.
    let mut have = have_xattrs.clone();
    have.retain(|k, _| k.0 != b"security.capability");
    sync_xattrs(dir, name, &have, meta.xattrs)
}

/// Apply [`Meta`] to an open regular file we created.
pub fn set_meta_fd(fd: BorrowedFd<'_>, meta: &Meta<'_>) -> io::Result<()> {
    rfs::fchown(
        fd,
        Some(rfs::Uid::from_raw(meta.uid)),
        Some(rfs::Gid::from_raw(meta.gid)),
    )?;
    rfs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    set_xattrs_fd(fd, meta.xattrs)
}

/// Set the mtime of `name` in `dir` (not following a symlink).
pub fn set_mtime_at(dir: BorrowedFd<'_>, name: &[u8], mtime_ns: i64) -> io::Result<()> {
    let n: &OsStr = OsStr::from_bytes(name);
    Ok(rfs::utimensat(
        dir,
        n,
        &timestamps(mtime_ns),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

/// Set the mtime of an open file.
pub fn set_mtime_fd(fd: BorrowedFd<'_>, mtime_ns: i64) -> io::Result<()> {
    Ok(rfs::futimens(fd, &timestamps(mtime_ns))?)
}

/// Create a special node (device, fifo, socket) named `name` in `dir`.
pub fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    ftype: FileType,
    mode: u32,
    rdev: u64,
) -> io::Result<()> {
    let ft = match ftype {
        FileType::Char => rfs::FileType::CharacterDevice,
        FileType::Block => rfs::FileType::BlockDevice,
        FileType::Fifo => rfs::FileType::Fifo,
        FileType::Socket => rfs::FileType::Socket,
        other => return Err(io::Error::other(format!("mknod of a {}", other.label()))),
    };
    Ok(rfs::mknodat(
        dir,
        OsStr::from_bytes(name),
        ft,
        Mode::from_raw_mode(mode & 0o777),
        rdev,
    )?)
}

/// Create a symlink `name` in `dir` pointing at `target`.
pub fn symlink_at(dir: BorrowedFd<'_>, name: &[u8], target: &[u8]) -> io::Result<()> {
    Ok(rfs::symlinkat(
        OsStr::from_bytes(target),
        dir,
        OsStr::from_bytes(name),
    )?)
}

/// Create a directory.
pub fn mkdir_at(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    Ok(rfs::mkdirat(
        dir,
        OsStr::from_bytes(name),
        Mode::from_raw_mode(mode),
    )?)
}

/// Create a new, exclusive regular file for writing.
pub fn create_file_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<File> {
    let fd = rfs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    Ok(File::from(fd))
}

/// Hard-link `from` (in `from_dir`) as `to` (in `to_dir`).
pub fn link_at(
    from_dir: BorrowedFd<'_>,
    from: &[u8],
    to_dir: BorrowedFd<'_>,
    to: &[u8],
) -> io::Result<()> {
    Ok(rfs::linkat(
        from_dir,
        OsStr::from_bytes(from),
        to_dir,
        OsStr::from_bytes(to),
        AtFlags::empty(),
    )?)
}

/// Atomically replace `to` with `from` (plain `rename`).
pub fn rename_at(
    from_dir: BorrowedFd<'_>,
    from: &[u8],
    to_dir: BorrowedFd<'_>,
    to: &[u8],
) -> io::Result<()> {
    Ok(rfs::renameat(
        from_dir,
        OsStr::from_bytes(from),
        to_dir,
        OsStr::from_bytes(to),
    )?)
}

/// Atomically swap two existing names (`RENAME_EXCHANGE`); used for type
/// changes, where a plain rename cannot replace a directory by a file or the
/// reverse.
pub fn exchange_at(
    a_dir: BorrowedFd<'_>,
    a: &[u8],
    b_dir: BorrowedFd<'_>,
    b: &[u8],
) -> io::Result<()> {
    Ok(rfs::renameat_with(
        a_dir,
        OsStr::from_bytes(a),
        b_dir,
        OsStr::from_bytes(b),
        rfs::RenameFlags::EXCHANGE,
    )?)
}

/// Remove a non-directory.
pub fn unlink_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    Ok(rfs::unlinkat(
        dir,
        OsStr::from_bytes(name),
        AtFlags::empty(),
    )?)
}

/// Remove an empty directory.
pub fn rmdir_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    Ok(rfs::unlinkat(
        dir,
        OsStr::from_bytes(name),
        AtFlags::REMOVEDIR,
    )?)
}

/// Remove `name` in `dir` and everything below it, staying on `dev` and
/// never following symlinks. Returns the number of objects removed.
pub fn remove_tree_at(dir: BorrowedFd<'_>, name: &[u8], dev: u64) -> io::Result<u64> {
    let st = match stat_at(dir, name) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    if st.ftype != FileType::Dir {
        unlink_at(dir, name)?;
        return Ok(1);
    }
    if st.dev != dev {
        return Err(io::Error::other(format!(
            "refusing to remove {}: another filesystem is mounted there",
            String::from_utf8_lossy(name)
        )));
    }
    let sub = rfs::openat(
        dir,
        OsStr::from_bytes(name),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut n = 0;
    for child in read_dir_names(sub.as_fd())? {
        n += remove_tree_at(sub.as_fd(), &child, dev)?;
    }
    drop(sub);
    rmdir_at(dir, name)?;
    Ok(n + 1)
}

/// Flush every dirty page and inode of the filesystem holding `fd`.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rfs::syncfs(fd)?)
}

/// Free bytes and inodes available to unprivileged... and privileged writers
/// (we run as root, so the reserved blocks count).
pub fn free_space(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let s = rfs::fstatvfs(fd)?;
    Ok((s.f_bfree.saturating_mul(s.f_frsize), s.f_ffree))
}

/// Write a small file atomically: temp file, fsync, rename, fsync directory.
pub fn write_atomic(dir: BorrowedFd<'_>, name: &[u8], data: &[u8], mode: u32) -> io::Result<()> {
    write_via_temp(dir, name, data, mode, true)
}

/// Write a small file by temp + rename, without an fsync: for files written
/// just before a `syncfs` that makes them durable together.
pub fn write_renamed(dir: BorrowedFd<'_>, name: &[u8], data: &[u8], mode: u32) -> io::Result<()> {
    write_via_temp(dir, name, data, mode, false)
}

fn write_via_temp(
    dir: BorrowedFd<'_>,
    name: &[u8],
    data: &[u8],
    mode: u32,
    durable: bool,
) -> io::Result<()> {
    use std::io::Write;
    let mut tmp = name.to_vec();
    tmp.extend_from_slice(b".imageupd-tmp");
    let _ = unlink_at(dir, &tmp);
    let mut f = create_file_at(dir, &tmp)?;
    f.write_all(data)?;
    rfs::fchmod(f.as_fd(), Mode::from_raw_mode(mode))?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    rename_at(dir, &tmp, dir, name)?;
    if durable {
        rfs::fsync(dir)?;
    }
    Ok(())
}

/// Read a whole small file below `root`.
pub fn read_beneath(root: BorrowedFd<'_>, rel: &RelPath) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = open_file_beneath(root, rel)?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

/// Make sure the directory chain `rel` exists below `root` (mode 0755 for
/// new ones) and open it.
pub fn ensure_dir_beneath(root: BorrowedFd<'_>, rel: &RelPath, mode: u32) -> io::Result<OwnedFd> {
    match open_dir_beneath(root, rel) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = rel.parent().unwrap_or_else(RelPath::root);
    let pfd = ensure_dir_beneath(root, &parent, mode)?;
    match mkdir_at(pfd.as_fd(), rel.file_name(), mode) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    open_dir_beneath(root, rel)
}
