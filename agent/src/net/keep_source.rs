//! The source of a rollback in place (`keep+<original source>`): the
//! previous image's manifest from the node's own record, and its contents
//! from the keep area — the inodes the last swap replaced, hard-linked
//! into `var/lib/imageupd/keep/<sha256-hex>` before it — so going back
//! needs no network. The keep area is a cache: every object is verified
//! by its digest before it is used, and whatever is missing or damaged
//! comes from the original source, as a normal update would fetch it.

use std::collections::HashSet;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;

use anyhow::Result;

use crate::format::manifest::{Digest, Entry, RelPath};
use crate::format::trust::{verify_stored, Resolved, Trust};
use crate::fs::fsx;
use crate::net::fetch::DownloadReport;
use crate::net::source::Source;
use crate::sys::progress::Progress;

/// Prefix of a `--from` (and a journal's source) naming the keep area in
/// front of the original source.
pub const KEEP_PREFIX: &str = "keep+";

/// Name of the keep area in the state directory (`var/lib/imageupd`).
pub const KEEP_DIR: &[u8] = b"keep";

/// A manifest as the store served it: its stored bytes and signature.
pub type StoredManifest = (Vec<u8>, Option<Vec<u8>>);

/// The original source of a `keep+` location, if `from` is one.
pub fn strip_keep(from: &str) -> Option<&str> {
    from.strip_prefix(KEEP_PREFIX)
}

/// The keep area in front of an original source.
pub struct KeepSource {
    /// The keep directory, when there is one.
    dir: Option<OwnedFd>,
    /// The target's manifest as the node recorded it (stored bytes and
    /// signature), when a record of it is kept.
    record: Option<StoredManifest>,
    /// Where everything else comes from.
    inner: Source,
    /// Objects read back from the keep area and found intact.
    verified: Mutex<HashSet<Digest>>,
}

impl KeepSource {
    /// The keep area below the state directory `state` (absent: every
    /// object comes from `inner`), the target's `record` if the node has
    /// one, in front of `inner`.
    pub fn open(
        state: Option<BorrowedFd<'_>>,
        record: Option<StoredManifest>,
        inner: Source,
    ) -> Result<KeepSource> {
        let dir = match state {
            Some(s) => match fsx::open_dir_beneath(s, &RelPath(KEEP_DIR.to_vec())) {
                Ok(d) => Some(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(anyhow::Error::from(e)
                        .context("opening the keep area var/lib/imageupd/keep"))
                }
            },
            None => None,
        };
        Ok(KeepSource {
            dir,
            record,
            inner,
            verified: Mutex::new(HashSet::new()),
        })
    }

    /// Short description for logs and hooks.
    pub fn describe(&self) -> String {
        format!("kept inodes, then the {}", self.inner.describe())
    }

    /// The `--from` string to record for resuming.
    pub fn location(&self) -> String {
        format!("{KEEP_PREFIX}{}", self.inner.location())
    }

    /// The manifest of `id`: the node's record when it has one (checked
    /// like a downloaded one), else the original source's.
    pub fn manifest(&self, id: &str, trust: &Trust<'_>, threads: usize) -> Result<Resolved> {
        match &self.record {
            Some((stored, sig)) => verify_stored(id, stored.clone(), sig.clone(), trust),
            None => {
                tracing::warn!(
                    "no record of {id} on the node; its manifest comes from the {}",
                    self.inner.describe()
                );
                self.inner.manifest(id, trust, threads)
            }
        }
    }

    fn open_kept(&self, d: &Digest) -> io::Result<std::fs::File> {
        let dir = self
            .dir
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        fsx::open_file_beneath(dir.as_fd(), &RelPath(d.to_hex().into_bytes()))
    }

    /// Whether the keep area holds `d` intact (read back and hashed).
    fn kept_intact(&self, d: &Digest, size: u64) -> bool {
        let f = match self.open_kept(d) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return false,
            Err(e) => {
                tracing::warn!("kept object {d}: {e}; taking it from the original source");
                return false;
            }
        };
        match crate::format::stream::digest_of(io::BufReader::with_capacity(256 * 1024, f)) {
            Ok((got, n)) if &got == d && n == size => true,
            Ok((got, n)) => {
                tracing::warn!("kept object {d} holds {got} ({n} bytes) instead; taking it from the original source");
                false
            }
            Err(e) => {
                tracing::warn!("reading kept object {d}: {e}; taking it from the original source");
                false
            }
        }
    }

    /// Open the content of a file entry: the kept inode when it was found
    /// intact at the fetch step, else the original source's.
    pub fn open_content(&self, d: &Digest, e: &Entry) -> io::Result<Box<dyn Read + Send + '_>> {
        let kept = self.verified.lock().map(|v| v.contains(d)).unwrap_or(false);
        if kept {
            return Ok(Box::new(self.open_kept(d)?));
        }
        self.inner.open_content(d, e)
    }

    /// Fetch step: check each object of `fetch` in the keep area; only
    /// those missing or damaged there are fetched from the original source.
    pub fn prefetch(
        &self,
        fetch: &[(Digest, u64)],
        state: BorrowedFd<'_>,
        progress: &Progress,
    ) -> Result<()> {
        let mut missing = Vec::new();
        let mut found = HashSet::new();
        for (d, size) in fetch {
            if self.kept_intact(d, *size) {
                found.insert(*d);
            } else {
                missing.push((*d, *size));
            }
        }
        let kept = found.len();
        if let Ok(mut v) = self.verified.lock() {
            v.extend(found);
        }
        if missing.is_empty() {
            tracing::info!("all {kept} objects come from the keep area");
            return Ok(());
        }
        tracing::warn!(
            "{} of {} objects are not in the keep area; fetching them from the {}",
            missing.len(),
            fetch.len(),
            self.inner.describe()
        );
        self.inner.prefetch(&missing, state, progress)
    }

    /// Extra free bytes the fetch step needs: what the keep area lacks.
    pub fn cache_space(&self, fetch: &[(Digest, u64)]) -> u64 {
        let missing: Vec<(Digest, u64)> = fetch
            .iter()
            .filter(|(d, _)| self.open_kept(d).is_err())
            .copied()
            .collect();
        self.inner.cache_space(&missing)
    }

    /// The original source's network counters.
    pub fn download_report(&self) -> Option<DownloadReport> {
        self.inner.download_report()
    }

    /// Once staging is done: the original source's cache.
    pub fn drop_cache(&self, state: BorrowedFd<'_>) -> Result<()> {
        self.inner.drop_cache(state)
    }
}

/// Remove the keep area below the state directory `state` (never leaving
/// the state directory's filesystem); the number of objects removed.
pub fn drop_keep(state: BorrowedFd<'_>) -> Result<u64> {
    let removed = fsx::stat_fd(state).and_then(|st| fsx::remove_tree_at(state, KEEP_DIR, st.dev));
    removed
        .map_err(anyhow::Error::from)
        .map_err(|e| e.context("removing the keep area var/lib/imageupd/keep"))
}
