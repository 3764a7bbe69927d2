//! The root being updated: its pinned descriptor, filesystem, state
//! directory (`var/lib/imageupd`) and runtime directory (lock, live status).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::format::manifest::RelPath;
use crate::fs::fsx;

/// State directory relative to the root.
pub const STATE_DIR: &str = "var/lib/imageupd";
/// Runtime directory for the real root.
pub const RUN_DIR: &str = "/run/imageupd";

/// An opened root.
pub struct RootFs {
    /// Canonical path.
    pub path: PathBuf,
    /// Pinned descriptor of the top directory.
    pub fd: OwnedFd,
    /// Device of the root's filesystem (the apply never leaves it).
    pub dev: u64,
}

impl RootFs {
    /// Open a root directory.
    pub fn open(path: &Path) -> Result<RootFs> {
        let canon = std::fs::canonicalize(path)
            .with_context(|| format!("root {} does not exist", path.display()))?;
        let fd =
            fsx::open_dir(&canon).with_context(|| format!("opening root {}", canon.display()))?;
        let dev = fsx::stat_fd(fd.as_fd())?.dev;
        Ok(RootFs {
            path: canon,
            fd,
            dev,
        })
    }

    /// Borrow the descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// True for the running system's root.
    pub fn is_host_root(&self) -> bool {
        self.path == Path::new("/")
    }

    /// Open the state directory if it exists.
    pub fn state_dir(&self) -> Result<Option<OwnedFd>> {
        match fsx::open_dir_beneath(self.fd(), &RelPath(STATE_DIR.as_bytes().to_vec())) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("opening {}/{STATE_DIR}", self.path.display()))
            }
        }
    }

    /// Open the state directory, creating it (and missing parents) if needed.
    pub fn ensure_state_dir(&self) -> Result<OwnedFd> {
        fsx::ensure_dir_beneath(self.fd(), &RelPath(STATE_DIR.as_bytes().to_vec()), 0o755)
            .with_context(|| format!("creating {}/{STATE_DIR}", self.path.display()))
    }

    /// Host directory for this root's lock and live status. The real root
    /// uses `/run/imageupd`; any other root gets its own subdirectory, so
    /// that tests and chroots never contend with the host.
    pub fn runtime_dir(&self) -> PathBuf {
        if self.is_host_root() {
            PathBuf::from(RUN_DIR)
        } else {
            use std::os::unix::ffi::OsStrExt;
            let h = crate::format::manifest::Digest::of(self.path.as_os_str().as_bytes()).to_hex();
            Path::new(RUN_DIR).join("roots").join(&h[..16])
        }
    }

    /// The recorded current image id (`etc/image_id`), if any.
    pub fn image_id(&self) -> Result<Option<String>> {
        match fsx::read_beneath(self.fd(), &RelPath(b"etc/image_id".to_vec())) {
            Ok(b) => {
                Ok(Some(String::from_utf8_lossy(&b).trim().to_string()).filter(|s| !s.is_empty()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("reading etc/image_id"),
        }
    }
}

/// The running kernel release (`uname -r`).
pub fn running_release() -> Option<String> {
    nix::sys::utsname::uname()
        .ok()
        .map(|u| u.release().to_string_lossy().into_owned())
}

/// Stored current manifest, in the state directory.
pub const CURRENT_MANIFEST: &[u8] = b"current.manifest.json.zst";

/// Its signature.
pub const CURRENT_SIG: &[u8] = b"current.manifest.json.zst.sig";

/// The previous image's manifest (for rollback).
pub const PREVIOUS_MANIFEST: &[u8] = b"previous.manifest.json.zst";

/// Its signature.
pub const PREVIOUS_SIG: &[u8] = b"previous.manifest.json.zst.sig";
