//! Where an update comes from: a store directory (signed manifests and
//! objects) or a directory holding a mounted image (the operator vouches for
//! it; the manifest is computed by walking it), or an HTTP(S) store
//! ([`crate::net::fetch`]).

use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::format::kernel;
use crate::format::manifest::{Digest, DiskArtifact, Entry, Manifest, LEGACY_FORMAT};
use crate::format::stream::CappedReader;
use crate::format::trust::{verify_stored, Resolved, Trust};
use crate::fs::fsx;
use crate::fs::scan::{self, ScanOptions};
use crate::fs::store::Store;
use crate::net::fetch::{DownloadReport, HttpStore, NetOptions};
use crate::net::keep_source::KeepSource;
use crate::sys::error::ExitKind;

/// An update source.
pub enum Source {
    /// A local store directory.
    Store(Store),
    /// A directory holding a mounted (or unpacked) image.
    Dir {
        /// Its path.
        path: PathBuf,
        /// Pinned descriptor of its top.
        fd: OwnedFd,
    },
    /// A store reached over HTTP(S).
    Http(Box<HttpStore>),
    /// A rollback in place: the keep area, then an original source
    /// ([`crate::net::keep_source`]).
    Keep(Box<KeepSource>),
}

impl Source {
    /// Interpret `--from`: a store directory, an image directory, or an
    /// `http(s)://` store URL (with default network settings).
    pub fn open(from: &str) -> Result<Source> {
        Source::open_with(from, &NetOptions::default())
    }

    /// Like [`Source::open`], with network settings for URLs.
    pub fn open_with(from: &str, net: &NetOptions) -> Result<Source> {
        if crate::net::fetch::is_url(from) {
            return Ok(Source::Http(Box::new(HttpStore::open(from, net)?)));
        }
        let p = Path::new(from);
        if !p.is_dir() {
            return Err(anyhow::anyhow!("source {from} is not a directory"))
                .context(ExitKind::Source);
        }
        if Store::is_store(p) {
            Ok(Source::Store(Store::open(p).context(ExitKind::Source)?))
        } else {
            let fd = fsx::open_dir(p)
                .with_context(|| format!("opening source {from}"))
                .context(ExitKind::Source)?;
            Ok(Source::Dir {
                path: p.to_path_buf(),
                fd,
            })
        }
    }

    /// Whether this is a rollback in place's source (the keep area first).
    pub fn is_keep(&self) -> bool {
        matches!(self, Source::Keep(_))
    }

    /// Short description for logs and hooks.
    pub fn describe(&self) -> String {
        match self {
            Source::Store(s) => format!("store {}", s.path().display()),
            Source::Dir { path, .. } => format!("image directory {}", path.display()),
            Source::Http(h) => format!("store at {}", h.url()),
            Source::Keep(k) => k.describe(),
        }
    }

    /// The `--from` string to record for resuming.
    pub fn location(&self) -> String {
        match self {
            Source::Store(s) => s.path().display().to_string(),
            Source::Dir { path, .. } => path.display().to_string(),
            Source::Http(h) => h.url().to_string(),
            Source::Keep(k) => k.location(),
        }
    }

    /// A trust-metadata file of the store (`timestamp.json`,
    /// `root/<N>.root.json`), at most
    /// [`crate::format::tuf::envelope::MAX_ENVELOPE_BYTES`]; `None` when the
    /// store has none, or the source is an image directory (which carries
    /// no trust metadata). Unverified.
    pub fn trust_file(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Source::Store(st) => st.trust_file(rel).context(ExitKind::Source),
            Source::Http(h) => h.trust_file(rel),
            // A rollback in place reads nothing from the network; its
            // manifest is the node's own record (see apply::trust).
            Source::Dir { .. } | Source::Keep(_) => Ok(None),
        }
    }

    /// Fetch and verify the manifest of image `id`.
    pub fn manifest(&self, id: &str, trust: &Trust<'_>, threads: usize) -> Result<Resolved> {
        match self {
            Source::Keep(k) => k.manifest(id, trust, threads),
            Source::Store(st) => {
                let (stored, sig) = st.read_manifest_raw(id).context(ExitKind::Source)?;
                verify_stored(id, stored, sig, trust)
            }
            Source::Http(h) => {
                // An update delta from the node's image first; a manifest
                // rebuilt from it passes the same checks as a downloaded one,
                // and when it does not, the manifest is downloaded.
                let by_delta = h.manifest_from_delta(id).and_then(|(stored, sig)| {
                    verify_stored(id, stored, sig, trust)
                        .inspect_err(|e| {
                            tracing::warn!("the manifest from the update delta is refused ({e:#}); downloading it");
                            h.drop_delta();
                        })
                        .ok()
                });
                let r = match by_delta {
                    Some(r) => r,
                    None => {
                        let (stored, sig) = h.read_manifest_raw(id)?;
                        verify_stored(id, stored, sig, trust)?
                    }
                };
                // Packs are looked up (lazily, at the fetch step) for this image.
                h.use_packs(id, &r, trust);
                Ok(r)
            }
            Source::Dir { fd, .. } => {
                let nodes = scan::scan(fd.as_fd(), &ScanOptions::default())
                    .context("walking the image directory")?;
                let entries = scan::to_entries(fd.as_fd(), &nodes, threads)?;
                // An image directory carries no release: it is a legacy
                // (release 0) image, see crate::engine::releases.
                let m = Manifest {
                    format: LEGACY_FORMAT,
                    id: id.to_string(),
                    parent: None,
                    created: crate::sys::clock::now_rfc3339(),
                    kernel: kernel::detect(&entries),
                    channel: None,
                    release: None,
                    compatible: None,
                    disk: None,
                    entries,
                };
                m.validate()
                    .context("the image directory does not form a valid image")
                    .context(ExitKind::Untrusted)?;
                let stored = crate::format::codec::encode_manifest(&m)?;
                Ok(Resolved {
                    manifest: m,
                    stored,
                    sig: None,
                    signed_by: None,
                })
            }
        }
    }

    /// Open the content of a file entry (unverified; the caller verifies).
    /// More bytes than the entry's size are an error, so a decompression
    /// bomb stops at the declared size.
    pub fn open_content(&self, d: &Digest, e: &Entry) -> io::Result<Box<dyn Read + Send + '_>> {
        match self {
            Source::Store(st) => Ok(Box::new(CappedReader::new(st.open_object(d)?, e.size))),
            Source::Dir { fd, .. } => Ok(Box::new(CappedReader::new(
                fsx::open_file_beneath(fd.as_fd(), &e.path)?,
                e.size,
            ))),
            Source::Http(h) => h.open_content(d, e.size),
            Source::Keep(k) => k.open_content(d, e),
        }
    }

    /// Link a fetched copy of content `d` into `dir` as `name`, when the
    /// source holds one that can be (an HTTP store's download cache on the
    /// same filesystem); unverified: the caller checks what it linked.
    pub fn link_content(&self, d: &Digest, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
        match self {
            Source::Http(h) => h.link_content(d, dir, name),
            Source::Store(_) | Source::Dir { .. } | Source::Keep(_) => Ok(false),
        }
    }

    /// Open the published whole-disk image `disk` of image `id` (the
    /// signed manifest's record) as one stream of exactly `disk.size`
    /// bytes; unverified: the caller checks the digest as it reads. Only
    /// stores publish disk images.
    pub fn open_disk(&self, id: &str, disk: &DiskArtifact) -> Result<Box<dyn Read + Send + '_>> {
        disk.validate()
            .map_err(anyhow::Error::msg)
            .context(ExitKind::Untrusted)?;
        let rel = disk.store_path(id);
        match self {
            Source::Store(st) => {
                let p = st.path().join(&rel);
                let f = std::fs::File::open(&p)
                    .with_context(|| format!("opening the disk image {}", p.display()))
                    .context(ExitKind::Source)?;
                Ok(Box::new(CappedReader::new(f, disk.size)))
            }
            Source::Http(h) => h.open_stream(&rel, disk.size),
            Source::Dir { .. } | Source::Keep(_) => Err(anyhow::anyhow!(
                "{} holds no published disk images",
                self.describe()
            ))
            .context(ExitKind::Usage),
        }
    }

    /// Fetch step (SPEC §5.3): download the contents of `fetch` (digest,
    /// size in bytes) that a remote source must provide into the download
    /// cache below the state directory `state`. Local sources need nothing.
    pub fn prefetch(
        &self,
        fetch: &[(Digest, u64)],
        state: BorrowedFd<'_>,
        progress: &crate::sys::progress::Progress,
    ) -> Result<()> {
        match self {
            Source::Http(h) => h.prefetch(fetch, state, progress),
            Source::Keep(k) => k.prefetch(fetch, state, progress),
            Source::Store(_) | Source::Dir { .. } => Ok(()),
        }
    }

    /// Extra free bytes the fetch step needs on the root's filesystem (an
    /// upper bound: the download cache holds compressed objects).
    pub fn cache_space(&self, fetch: &[(Digest, u64)]) -> u64 {
        match self {
            Source::Http(_) => fetch.iter().map(|(_, s)| *s).sum(),
            Source::Keep(k) => k.cache_space(fetch),
            Source::Store(_) | Source::Dir { .. } => 0,
        }
    }

    /// Network counters, for remote sources.
    pub fn download_report(&self) -> Option<DownloadReport> {
        match self {
            Source::Http(h) => Some(h.report()),
            Source::Keep(k) => k.download_report(),
            Source::Store(_) | Source::Dir { .. } => None,
        }
    }

    /// Once staging is done: drop the download cache below `state`.
    pub fn drop_cache(&self, state: BorrowedFd<'_>) -> Result<()> {
        match self {
            Source::Http(_) => crate::net::fetch::drop_cache(state).map(|_| ()),
            Source::Keep(k) => k.drop_cache(state),
            Source::Store(_) | Source::Dir { .. } => Ok(()),
        }
    }
}
