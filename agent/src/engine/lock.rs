//! The apply lock shared by `imageupd apply`, the agent and the
//! os-refresh-config scripts: a non-blocking `flock` in the runtime
//! directory, holding the owner's pid for the error message.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};

use crate::sys::error::ExitKind;

/// A held lock; released on drop (and by the kernel if we die).
pub struct Lock {
    _flock: Flock<File>,
}

impl Lock {
    /// Take the lock in `dir` or fail at once, naming the holder.
    pub fn acquire(dir: &Path) -> Result<Lock> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("lock");
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(mut fl) => {
                fl.set_len(0)?;
                fl.rewind()?;
                write!(fl, "{}", std::process::id())?;
                Ok(Lock { _flock: fl })
            }
            Err((_, errno)) => Err(anyhow::anyhow!(
                "another imageupd (pid {}) is applying an update to this root ({}: {errno}); nothing was changed",
                holder.trim(),
                path.display()
            ))
            .context(ExitKind::Locked),
        }
    }
}
