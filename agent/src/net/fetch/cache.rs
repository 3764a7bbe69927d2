//! The node's download cache below the state directory: verified objects
//! (`cache/objects/<aa>/<sha256>`, zstd frames as the store serves them)
//! and downloads in progress (`cache/partial/<sha256>`, resumed by `Range`).

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags};

use super::CACHE_DIR;
use crate::format::manifest::{Digest, RelPath};
use crate::format::stream::{CappedReader, VerifyReader};
use crate::fs::fsx;

/// The download cache's directories.
pub(super) struct Cache {
    objects: OwnedFd,
    partial: OwnedFd,
}

impl Cache {
    pub(super) fn create(state: BorrowedFd<'_>) -> io::Result<Cache> {
        let sub = |s: &str| {
            fsx::ensure_dir_beneath(
                state,
                &RelPath(format!("{CACHE_DIR}/{s}").into_bytes()),
                0o700,
            )
        };
        Ok(Cache {
            objects: sub("objects")?,
            partial: sub("partial")?,
        })
    }

    pub(super) fn rel(d: &Digest) -> RelPath {
        let h = d.to_hex();
        RelPath(format!("{}/{h}", &h[..2]).into_bytes())
    }

    pub(super) fn open(&self, d: &Digest) -> io::Result<File> {
        fsx::open_file_beneath(self.objects.as_fd(), &Cache::rel(d))
    }

    pub(super) fn open_part(&self, d: &Digest, create: bool) -> io::Result<File> {
        let mut flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        if create {
            flags |= OFlags::CREATE;
        }
        let fd = rustix::fs::openat(
            self.partial.as_fd(),
            d.to_hex(),
            flags,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(File::from(fd))
    }

    /// Decompress and hash a cached or downloaded frame.
    pub(super) fn verify(&self, f: &File, d: &Digest, size: u64) -> Result<()> {
        let mut f = f.try_clone()?;
        f.seek(SeekFrom::Start(0))?;
        let dec = zstd::stream::read::Decoder::new(f).context("not a zstd frame")?;
        // A frame that decompresses past the declared size (a zstd bomb)
        // stops there instead of running on.
        VerifyReader::new(CappedReader::new(dec, size))
            .finish(d, size)
            .context("not a valid zstd frame of the declared size")?
            .map_err(anyhow::Error::new)
    }

    pub(super) fn commit(&self, d: &Digest) -> io::Result<()> {
        let h = d.to_hex();
        let sub = fsx::ensure_dir_beneath(
            self.objects.as_fd(),
            &RelPath(h.as_bytes()[..2].to_vec()),
            0o700,
        )?;
        fsx::rename_at(
            self.partial.as_fd(),
            h.as_bytes(),
            sub.as_fd(),
            h.as_bytes(),
        )
    }

    pub(super) fn remove(&self, d: &Digest) -> Result<()> {
        let h = d.to_hex();
        let sub =
            fsx::open_dir_beneath(self.objects.as_fd(), &RelPath(h.as_bytes()[..2].to_vec()))?;
        fsx::unlink_at(sub.as_fd(), h.as_bytes())
            .with_context(|| format!("removing damaged cached object {d}"))
    }

    pub(super) fn remove_part(&self, d: &Digest) -> Result<()> {
        match fsx::unlink_at(self.partial.as_fd(), d.to_hex().as_bytes()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing the download of {d}"))
            }
            _ => Ok(()),
        }
    }

    /// Remove everything not named in `keep`; returns how many entries went.
    pub(super) fn prune(&self, keep: &HashSet<Digest>) -> Result<u64> {
        let wanted = |name: &[u8]| {
            std::str::from_utf8(name)
                .ok()
                .and_then(|s| Digest::from_hex(s).ok())
                .is_some_and(|d| keep.contains(&d))
        };
        let mut n = 0;
        for name in fsx::read_dir_names(self.partial.as_fd())? {
            if !wanted(&name) {
                fsx::unlink_at(self.partial.as_fd(), &name)?;
                n += 1;
            }
        }
        for sub in fsx::read_dir_names(self.objects.as_fd())? {
            let Ok(sfd) = fsx::open_dir_beneath(self.objects.as_fd(), &RelPath(sub.clone())) else {
                fsx::unlink_at(self.objects.as_fd(), &sub)?;
                n += 1;
                continue;
            };
            for name in fsx::read_dir_names(sfd.as_fd())? {
                if !wanted(&name) {
                    fsx::unlink_at(sfd.as_fd(), &name)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}
