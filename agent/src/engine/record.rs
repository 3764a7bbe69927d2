//! The node's record of its images, in the state directory: the manifest of
//! the current image (and the previous one, for rollback) exactly as the store
//! served it, so its signature stays checkable; plus `etc/image_id`.
//!
//! The new image's record is written before the quiesce window under a
//! temporary name and only renamed into place at commit.

use std::os::fd::{AsFd, OwnedFd};

use anyhow::{Context, Result};

use crate::format::manifest::{Manifest, RelPath};
use crate::format::trust::Resolved;
use crate::fs::fsx;
use crate::fs::rootfs::{RootFs, CURRENT_MANIFEST, CURRENT_SIG, PREVIOUS_MANIFEST, PREVIOUS_SIG};

/// Stored bytes of the record of the image being applied, until commit.
const NEXT_MANIFEST: &[u8] = b"next.manifest.json.zst";
/// Its signature.
const NEXT_SIG: &[u8] = b"next.manifest.json.zst.sig";
/// The node's record of its current image, decompressed and parsed only on
/// demand.
pub struct CurrentRecord {
    /// Stored (compressed) bytes, when present and different from the target.
    pub stored: Option<Vec<u8>>,
    /// The record is byte-identical to the target's manifest.
    pub same_as_target: bool,
    /// Its image id, when it differs from the target (read from the head).
    pub id: Option<String>,
    /// Its kernel (read from the head).
    pub kernel: Option<crate::format::manifest::KernelInfo>,
}

/// What the head of a manifest says (the part before its entries).
#[derive(serde::Deserialize, Default)]
struct Head {
    id: Option<String>,
    kernel: Option<crate::format::manifest::KernelInfo>,
}

/// The head of a stored manifest. Manifests written in frames
/// ([`crate::format::mframes`]) have the head alone in their first frame, so only
/// that is decompressed; anything else is decompressed whole.
fn read_head(stored: &[u8]) -> Option<Head> {
    let first = crate::format::mframes::split(stored)
        .ok()
        .and_then(|f| f.first().copied())?;
    let text = zstd::decode_all(first).ok()?;
    let line = text.split(|&b| b == b'\n').next()?;
    if let Some(h) = line.strip_suffix(b",\"entries\":[") {
        let mut obj = h.to_vec();
        obj.push(b'}');
        if let Ok(h) = serde_json::from_slice::<Head>(&obj) {
            return Some(h);
        }
    }
    let json = zstd::decode_all(stored).ok()?;
    serde_json::from_slice::<Head>(&json).ok()
}

impl CurrentRecord {
    /// Read the record; `target_stored` short-cuts the common no-op case.
    pub fn load(state: &Option<OwnedFd>, target_stored: &[u8]) -> CurrentRecord {
        let none = CurrentRecord {
            stored: None,
            same_as_target: false,
            id: None,
            kernel: None,
        };
        let Some(s) = state.as_ref() else { return none };
        let Ok(bytes) = fsx::read_beneath(s.as_fd(), &RelPath(CURRENT_MANIFEST.to_vec())) else {
            return none;
        };
        if bytes == target_stored {
            return CurrentRecord {
                stored: None,
                same_as_target: true,
                id: None,
                kernel: None,
            };
        }
        let Some(head) = read_head(&bytes) else {
            tracing::warn!("ignoring unreadable record of the current image");
            return none;
        };
        CurrentRecord {
            stored: Some(bytes),
            same_as_target: false,
            id: head.id,
            kernel: head.kernel,
        }
    }

    /// Decompress and parse the record (a warning, not an error, when it is
    /// unreadable).
    pub fn parse(&self) -> Option<Manifest> {
        let parsed = crate::format::codec::decode_manifest(self.stored.as_ref()?);
        match parsed {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("ignoring unreadable record of the current image: {e:#}");
                None
            }
        }
    }
}

/// Write the new image's record under a temporary name (made durable by the
/// syncfs before the swap).
pub fn write_next_record(state: &OwnedFd, r: &Resolved) -> Result<()> {
    let s = state.as_fd();
    match &r.sig {
        Some(sig) => fsx::write_renamed(s, NEXT_SIG, sig, 0o644)?,
        None => match fsx::unlink_at(s, NEXT_SIG) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("removing a stale next.manifest signature"),
        },
    }
    fsx::write_renamed(s, NEXT_MANIFEST, &r.stored, 0o644)
        .context("recording the new image's manifest")
}

/// At commit: current becomes previous (when the image changes), next
/// becomes current. Renames only.
pub fn promote_next_record(state: &OwnedFd, image_changes: bool) -> Result<()> {
    let s = state.as_fd();
    let ignore_missing = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    if image_changes {
        ignore_missing(fsx::rename_at(s, CURRENT_MANIFEST, s, PREVIOUS_MANIFEST))?;
        ignore_missing(fsx::unlink_at(s, PREVIOUS_SIG))?;
        ignore_missing(fsx::rename_at(s, CURRENT_SIG, s, PREVIOUS_SIG))?;
    }
    ignore_missing(fsx::unlink_at(s, CURRENT_SIG))?;
    ignore_missing(fsx::rename_at(s, NEXT_SIG, s, CURRENT_SIG))?;
    fsx::rename_at(s, NEXT_MANIFEST, s, CURRENT_MANIFEST)
        .context("recording the new image's manifest")
}

/// Write `etc/image_id` durably (temp, fsync, rename, fsync of etc/): other
/// tools read it, and a rename that outlives its bytes in a power cut would
/// leave it empty.
pub fn write_image_id(root: &RootFs, id: &str) -> Result<()> {
    let etc = fsx::open_dir_beneath(root.fd(), &RelPath(b"etc".to_vec()))
        .context("opening etc/ to record the image id")?;
    fsx::write_atomic(
        etc.as_fd(),
        b"image_id",
        format!("{id}\n").as_bytes(),
        0o644,
    )
    .context("writing etc/image_id")
}

/// Id of the previous image, from its record.
pub fn previous_id(state: std::os::fd::BorrowedFd<'_>) -> Result<Option<String>> {
    let bytes = match fsx::read_beneath(state, &RelPath(PREVIOUS_MANIFEST.to_vec())) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("reading the previous image's record"),
    };
    let json = zstd::decode_all(&bytes[..]).context("decompressing the previous image's record")?;
    #[derive(serde::Deserialize)]
    struct Head {
        id: String,
    }
    let h: Head = serde_json::from_slice(&json).context("parsing the previous image's record")?;
    Ok(Some(h.id))
}

/// The node's own record of image `id` (stored bytes and signature, as the
/// store served them), for a rollback in place: the previous image's
/// record, else the current or the next one (a rollback interrupted around
/// its commit has already renamed them).
pub fn stored_record_of(
    state: std::os::fd::BorrowedFd<'_>,
    id: &str,
) -> Result<Option<crate::net::keep_source::StoredManifest>> {
    for (m, sig) in [
        (PREVIOUS_MANIFEST, PREVIOUS_SIG),
        (CURRENT_MANIFEST, CURRENT_SIG),
        (NEXT_MANIFEST, NEXT_SIG),
    ] {
        let bytes = match fsx::read_beneath(state, &RelPath(m.to_vec())) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the record {}", String::from_utf8_lossy(m)))
            }
        };
        if read_head(&bytes).and_then(|h| h.id).as_deref() != Some(id) {
            continue;
        }
        let sig = match fsx::read_beneath(state, &RelPath(sig.to_vec())) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading the signature {}", String::from_utf8_lossy(sig))
                })
            }
        };
        return Ok(Some((bytes, sig)));
    }
    Ok(None)
}
