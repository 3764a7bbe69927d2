//! The node's download cache below the state directory: verified objects,
//! either as zstd frames as the store serves them (`cache/objects/<aa>/<sha256>`)
//! or as their plain content (`cache/raw/<aa>/<sha256>`), and downloads in
//! progress (`cache/partial/<sha256>`, resumed by `Range`).
//!
//! Objects that arrive decompressed anyway (cut out of a pack's solid block,
//! rebuilt from an update delta) are kept plain: compressing them again only
//! for staging to decompress them once more cost a first install most of its
//! fetch time, and a zstd context per small object.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result};
use rustix::fs::{Mode, OFlags};

use super::CACHE_DIR;
use crate::format::manifest::{Digest, FileType, RelPath};
use crate::format::stream::{CappedReader, VerifyReader};
use crate::fs::fsx;

/// The download cache's directories.
pub(super) struct Cache {
    objects: OwnedFd,
    raw: OwnedFd,
    partial: OwnedFd,
}

/// How a cached object is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kept {
    /// A zstd frame, as the store serves it.
    Frame,
    /// The plain content.
    Raw,
}

/// Suffix of a plain object's name while it is written in `partial/`
/// (apart from a resumable frame download of the same object).
const RAW_PART_SUFFIX: &str = ".raw";

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
            raw: sub("raw")?,
            partial: sub("partial")?,
        })
    }

    pub(super) fn rel(d: &Digest) -> RelPath {
        let h = d.to_hex();
        RelPath(format!("{}/{h}", &h[..2]).into_bytes())
    }

    /// The cached object `d`: its plain content when kept so, else its frame.
    pub(super) fn open(&self, d: &Digest) -> io::Result<(File, Kept)> {
        match fsx::open_file_beneath(self.raw.as_fd(), &Cache::rel(d)) {
            Ok(f) => return Ok((f, Kept::Raw)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fsx::open_file_beneath(self.objects.as_fd(), &Cache::rel(d)).map(|f| (f, Kept::Frame))
    }

    /// The content of a cached object of `size` bytes (unverified: more
    /// than `size` bytes is an error, the caller checks the digest).
    pub(super) fn content(f: File, kept: Kept, size: u64) -> io::Result<Box<dyn Read + Send>> {
        Ok(match kept {
            Kept::Frame => Box::new(CappedReader::new(
                zstd::stream::read::Decoder::new(f)?,
                size,
            )),
            Kept::Raw => Box::new(CappedReader::new(f, size)),
        })
    }

    /// A new, empty file for the plain content of `d` (a leftover of a
    /// killed run is removed first rather than truncated: ext4 flushes a
    /// file truncated to zero when it is closed).
    pub(super) fn create_raw(&self, d: &Digest) -> io::Result<File> {
        let name = format!("{}{RAW_PART_SUFFIX}", d.to_hex());
        match fsx::unlink_at(self.partial.as_fd(), name.as_bytes()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let fd = rustix::fs::openat(
            self.partial.as_fd(),
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(File::from(fd))
    }

    /// Move the plain content written by [`Self::create_raw`] into the cache.
    pub(super) fn commit_raw(&self, d: &Digest) -> io::Result<()> {
        let h = d.to_hex();
        self.move_in(&format!("{h}{RAW_PART_SUFFIX}"), &self.raw, &h)
    }

    /// Rename `partial/<part>` to `<top>/<aa>/<hex>`.
    fn move_in(&self, part: &str, top: &OwnedFd, h: &str) -> io::Result<()> {
        let sub =
            fsx::ensure_dir_beneath(top.as_fd(), &RelPath(h.as_bytes()[..2].to_vec()), 0o700)?;
        fsx::rename_at(
            self.partial.as_fd(),
            part.as_bytes(),
            sub.as_fd(),
            h.as_bytes(),
        )
    }

    /// Link the plain cached content of `d` into `dir` as `name`: `false`
    /// when the cache holds no plain copy of it, it is on another
    /// filesystem, or it already has another link (a plain copy has one
    /// name only, so a staged file never shares its inode with anything
    /// but the cache).
    pub(super) fn link_raw(
        &self,
        d: &Digest,
        dir: BorrowedFd<'_>,
        name: &[u8],
    ) -> io::Result<bool> {
        let h = d.to_hex();
        let sub =
            match fsx::open_dir_beneath(self.raw.as_fd(), &RelPath(h.as_bytes()[..2].to_vec())) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            };
        match fsx::stat_at(sub.as_fd(), h.as_bytes()) {
            Ok(st) if st.nlink == 1 && st.ftype == FileType::File => {}
            Ok(_) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        }
        match fsx::link_at(sub.as_fd(), h.as_bytes(), dir, name) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Drop what [`Self::create_raw`] began for `d`.
    pub(super) fn remove_raw_part(&self, d: &Digest) -> Result<()> {
        let name = format!("{}{RAW_PART_SUFFIX}", d.to_hex());
        match fsx::unlink_at(self.partial.as_fd(), name.as_bytes()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing the unfinished copy of {d}"))
            }
            _ => Ok(()),
        }
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
        self.verify_kept(f, Kept::Frame, d, size)
    }

    /// Hash a cached object kept as `kept` (decompressing a frame).
    pub(super) fn verify_kept(&self, f: &File, kept: Kept, d: &Digest, size: u64) -> Result<()> {
        let mut f = f.try_clone()?;
        f.seek(SeekFrom::Start(0))?;
        // A frame that decompresses past the declared size (a zstd bomb)
        // stops there instead of running on.
        let content = Cache::content(f, kept, size).context("not a zstd frame")?;
        let what = match kept {
            Kept::Frame => "not a valid zstd frame of the declared size",
            Kept::Raw => "reading the cached content",
        };
        VerifyReader::new(content)
            .finish(d, size)
            .context(what)?
            .map_err(anyhow::Error::new)
    }

    /// Move the frame downloaded in `partial/` into the cache.
    pub(super) fn commit(&self, d: &Digest) -> io::Result<()> {
        let h = d.to_hex();
        self.move_in(&h, &self.objects, &h)
    }

    /// Remove the cached object `d` (kept either way).
    pub(super) fn remove(&self, d: &Digest) -> Result<()> {
        let h = d.to_hex();
        for top in [&self.raw, &self.objects] {
            let sub = match fsx::open_dir_beneath(top.as_fd(), &RelPath(h.as_bytes()[..2].to_vec()))
            {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).context("opening the download cache"),
            };
            match fsx::unlink_at(sub.as_fd(), h.as_bytes()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing damaged cached object {d}"))
                }
                _ => {}
            }
        }
        Ok(())
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
        for top in [&self.objects, &self.raw] {
            for sub in fsx::read_dir_names(top.as_fd())? {
                let Ok(sfd) = fsx::open_dir_beneath(top.as_fd(), &RelPath(sub.clone())) else {
                    fsx::unlink_at(top.as_fd(), &sub)?;
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
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn cache() -> (tempfile::TempDir, Cache) {
        let dir = tempfile::tempdir().expect("tempdir");
        let fd = fsx::open_dir(dir.path()).expect("open tempdir");
        let c = Cache::create(fd.as_fd()).expect("cache");
        (dir, c)
    }

    fn put_raw(c: &Cache, content: &[u8]) -> Digest {
        let d = Digest::of(content);
        let mut f = c.create_raw(&d).expect("create");
        f.write_all(content).expect("write");
        c.commit_raw(&d).expect("commit");
        d
    }

    #[test]
    fn a_plain_copy_is_read_and_verified_as_its_content() {
        let (_t, c) = cache();
        let d = put_raw(&c, b"hello plain cache");
        let (f, kept) = c.open(&d).expect("open");
        assert_eq!(kept, Kept::Raw);
        c.verify_kept(&f, kept, &d, 17).expect("verifies");
        // The wrong size or digest is caught, and more than the size is refused.
        assert!(c.verify_kept(&f, kept, &d, 16).is_err());
        assert!(c.verify_kept(&f, kept, &Digest::of(b"other"), 17).is_err());
        drop(f);
        let (f, kept) = c.open(&d).expect("open again");
        let mut s = Vec::new();
        let r = Cache::content(f, kept, 5).and_then(|mut r| r.read_to_end(&mut s));
        assert!(r.is_err(), "a plain copy longer than declared is refused");
    }

    #[test]
    fn a_leftover_unfinished_copy_is_replaced_not_appended_to() {
        let (_t, c) = cache();
        let content = b"the real content";
        let d = Digest::of(content);
        let mut f = c.create_raw(&d).expect("create");
        f.write_all(b"garbage from a killed run, longer")
            .expect("write");
        drop(f);
        let d2 = put_raw(&c, content);
        assert_eq!(d, d2);
        let (f, kept) = c.open(&d).expect("open");
        c.verify_kept(&f, kept, &d, content.len() as u64)
            .expect("only the new bytes");
    }

    #[test]
    fn a_plain_copy_is_linked_once_and_pruned_and_removed() {
        let (t, c) = cache();
        let d = put_raw(&c, b"link me");
        let out = fsx::open_dir(t.path()).expect("dir");
        assert!(c.link_raw(&d, out.as_fd(), b"staged").expect("link"));
        assert_eq!(
            std::fs::read(t.path().join("staged")).expect("read"),
            b"link me"
        );
        // Now it has two names: never linked a second time.
        assert!(!c.link_raw(&d, out.as_fd(), b"again").expect("no link"));
        assert!(!c
            .link_raw(&Digest::of(b"absent"), out.as_fd(), b"x")
            .expect("absent"));
        let keep = HashSet::new();
        assert_eq!(c.prune(&keep).expect("prune"), 1);
        assert!(c.open(&d).is_err(), "pruned");
        let d = put_raw(&c, b"remove me");
        c.remove(&d).expect("remove");
        assert!(c.open(&d).is_err(), "removed");
        c.remove(&d).expect("removing twice is fine");
    }
}
