//! What the new node will trust, and the image checked against it before
//! any disk is written: the trusted keys installed into its
//! `/etc/imageupd/trusted.d`, and the root of trust (`root.json`) that, when
//! given, vouches for the image as it does for `apply` on a node with that
//! anchor (targets threshold, the store's signed index).

use std::path::Path;

use anyhow::{Context, Result};

use super::{ProvisionOptions, DEFAULT_ROOT_OF_TRUST};
use crate::format::trust::Resolved;
use crate::sys::error::ExitKind;

/// The trusted keys to install into the new root (name, bytes).
pub fn read_keys(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in rd {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".pub") && e.file_type()?.is_file() {
            out.push((
                name,
                std::fs::read(e.path())
                    .with_context(|| format!("reading {}", e.path().display()))?,
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// The root of trust's bytes: `--root-of-trust FILE` (which must exist),
/// else [`DEFAULT_ROOT_OF_TRUST`] when present.
pub fn read_anchor(given: Option<&Path>) -> Result<Option<Vec<u8>>> {
    let path = given.unwrap_or(Path::new(DEFAULT_ROOT_OF_TRUST));
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && given.is_none() => Ok(None),
        Err(e) => Err(e)
            .with_context(|| format!("reading the root of trust {}", path.display()))
            .context(ExitKind::Usage),
    }
}

/// Fetch and verify the image's manifest before any disk is written (an
/// untrusted image leaves the disks untouched): with a root of trust as
/// `apply` does (its targets keys sign, the store's signed index lists the
/// manifest), else against the trusted keys. Returns the key id that signed.
pub fn check_image(opts: &ProvisionOptions, anchor: Option<&[u8]>) -> Result<Option<String>> {
    Ok(verified_manifest(opts, anchor)?.1.signed_by)
}

/// [`check_image`], keeping the opened source (for the whole-disk stream
/// and its download counters) and the verified manifest.
pub fn verified_manifest(
    opts: &ProvisionOptions,
    anchor: Option<&[u8]>,
) -> Result<(crate::net::source::Source, Resolved)> {
    use crate::format::tuf::Root;
    let net =
        crate::net::fetch::NetOptions::for_root(opts.ca_file.as_deref(), None, Path::new("/"));
    let source = crate::net::source::Source::open_with(&opts.from, &net)?;
    let tuf = match anchor {
        Some(b) => {
            let root = Root::anchor(b)
                .map_err(|e| anyhow::Error::from(e).context(ExitKind::Untrusted))
                .context("the root of trust")?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            crate::apply::trust::refresh_from(root, None, &source, false, now)?
        }
        None => None,
    };
    let keys = match &tuf {
        Some(v) => v
            .root
            .role("targets")
            .keyids
            .iter()
            .filter_map(|k| v.root.keys.get(k).copied())
            .collect(),
        None => crate::format::sign::load_trusted(&opts.keys_dir)?,
    };
    let trust = crate::format::trust::Trust {
        keys: &keys,
        keys_dir: match &tuf {
            Some(v) => format!("the root of trust (root v{})", v.root.doc.version),
            None => opts.keys_dir.display().to_string(),
        },
        allow_unsigned: opts.allow_unsigned,
        tuf: tuf.as_ref().map(|v| (&v.root, v.index.as_ref())),
    };
    let r = source.manifest(&opts.id, &trust, 2)?;
    Ok((source, r))
}
