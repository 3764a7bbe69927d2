//! Extended attributes: read, set and brought in line with a manifest's,
//! without following a final symlink.

use crate::format::manifest::{RawBytes, XattrValue, Xattrs};
use rustix::fs::{self as rfs};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use super::with_what;

/// Size of the first buffer tried for xattr lists and values, in bytes; larger
/// ones are sized by a query.
const XATTR_BUF: usize = 4096;

/// The `/proc/self/fd` path that reaches `name` inside the pinned `dir`.
pub(super) fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(OsStr::from_bytes(&p))
}

/// All xattrs of `name` in `dir`, without following a final symlink.
pub fn read_xattrs(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Xattrs> {
    let path = proc_path(dir, name);
    let mut out = Xattrs::new();
    let mut buf = vec![0u8; XATTR_BUF];
    let len = match rfs::llistxattr(&path, &mut buf[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::RANGE) => {
            let n = rfs::llistxattr_query(&path)?;
            buf.resize(n, 0);
            rfs::llistxattr(&path, &mut buf[..])?
        }
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    if len == 0 {
        return Ok(out);
    }
    let names: Vec<Vec<u8>> = buf[..len]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| n.to_vec())
        .collect();
    for n in names {
        let cname = OsStr::from_bytes(&n);
        let mut vbuf = vec![0u8; XATTR_BUF];
        let vlen = match rfs::lgetxattr(&path, cname, &mut vbuf[..]) {
            Ok(v) => v,
            Err(rustix::io::Errno::RANGE) => {
                let q = rfs::lgetxattr_query(&path, cname)?;
                vbuf.resize(q, 0);
                rfs::lgetxattr(&path, cname, &mut vbuf[..])?
            }
            // Removed between list and get: treat as absent.
            Err(rustix::io::Errno::NODATA) => continue,
            Err(e) => return Err(e.into()),
        };
        vbuf.truncate(vlen);
        out.insert(RawBytes(n), XattrValue(vbuf));
    }
    Ok(out)
}

/// Make the xattrs of `name` in `dir` exactly `want`, given the current set.
pub fn sync_xattrs(
    dir: BorrowedFd<'_>,
    name: &[u8],
    have: &Xattrs,
    want: &Xattrs,
) -> io::Result<()> {
    if have == want {
        return Ok(());
    }
    let path = proc_path(dir, name);
    for k in have.keys() {
        if !want.contains_key(k) {
            match rfs::lremovexattr(&path, OsStr::from_bytes(&k.0)) {
                Ok(()) | Err(rustix::io::Errno::NODATA) => {}
                Err(e) => return Err(with_what(e.into(), "removing xattr", &k.0)),
            }
        }
    }
    for (k, v) in want {
        if have.get(k) != Some(v) {
            rfs::lsetxattr(
                &path,
                OsStr::from_bytes(&k.0),
                &v.0,
                rfs::XattrFlags::empty(),
            )
            .map_err(|e| with_what(e.into(), "setting xattr", &k.0))?;
        }
    }
    Ok(())
}

/// Set xattrs on an open descriptor we just created.
pub fn set_xattrs_fd(fd: BorrowedFd<'_>, want: &Xattrs) -> io::Result<()> {
    for (k, v) in want {
        rfs::fsetxattr(fd, OsStr::from_bytes(&k.0), &v.0, rfs::XattrFlags::empty())
            .map_err(|e| with_what(e.into(), "setting xattr", &k.0))?;
    }
    Ok(())
}
