//! The store's trust metadata at resolve: with a root of trust on the node
//! (`etc/imageupd/root.json`), follow the store's root chain from the
//! newest root this node knows, refuse an expired root, verify the signed
//! index against it and against the highest index version seen, and keep
//! both durably. The rules themselves are [`crate::format::tuf`]'s; this is
//! the I/O around them. Without `root.json` nothing changes: the keys in
//! `trusted.d` sign manifests, any one suffices, and no index is read.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use anyhow::{anyhow, Context, Result};

use crate::engine::report::IndexReport;
use crate::engine::trust_state;
use crate::format::tuf::{format_time, parse_time, Root, Timestamp, TufError};
use crate::net::source::Source;
use crate::sys::error::ExitKind;

/// The node's root of trust, relative to its root.
pub const ANCHOR: &str = "etc/imageupd/root.json";
/// Most root versions followed in one run (TUF's default cap is 32).
const MAX_ROOT_STEPS: u64 = 32;

/// A root of trust in force and the index verified against it.
pub struct Verified {
    /// The newest root of the chain.
    pub root: Root,
    /// The store's index (`None`: a rollback in place, which reads no
    /// store).
    pub index: Option<Timestamp>,
    /// For `apply --json`.
    pub report: Option<IndexReport>,
}

fn untrusted(e: TufError) -> anyhow::Error {
    anyhow::Error::from(e).context(ExitKind::Untrusted)
}

/// Verify the store's trust metadata for the node at `root_path`; `None`
/// when the node has no root of trust. `now` is the run's start (Unix
/// seconds): every expiry is checked against that one time.
pub fn refresh(
    root_path: &Path,
    state: Option<&OwnedFd>,
    source: &Source,
    allow_expired: bool,
    now: i64,
) -> Result<Option<Verified>> {
    let anchor_path = root_path.join(ANCHOR);
    let anchor = match std::fs::read(&anchor_path) {
        Ok(b) => Root::anchor(&b)
            .map_err(untrusted)
            .with_context(|| format!("the root of trust {}", anchor_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", anchor_path.display())),
    };
    refresh_from(anchor, state, source, allow_expired, now)
}

/// [`refresh`] from a root of trust already read and verified as an
/// anchor (`provision --root-of-trust FILE`, whose new root has none yet).
pub fn refresh_from(
    anchor: Root,
    state: Option<&OwnedFd>,
    source: &Source,
    allow_expired: bool,
    now: i64,
) -> Result<Option<Verified>> {
    if matches!(source, Source::Dir { .. }) {
        // An image directory carries no trust metadata; it is taken only
        // as an unsigned image (allow_unsigned), as without a root.
        return Ok(None);
    }
    if matches!(source, Source::Keep(_)) {
        return offline(anchor, state).map(Some);
    }
    let mut st = match state {
        Some(s) => trust_state::load(s.as_fd())?,
        None => Default::default(),
    };
    let kept = st
        .root
        .as_deref()
        .map(|r| Root::anchor(r.as_bytes()))
        .transpose()
        .map_err(untrusted)
        .context("var/lib/imageupd/trust.json holds a root that no longer verifies")?;
    // The newer of the image's anchor and the root this node followed: a
    // rotation once seen is never undone by an older image's anchor.
    let start = match kept {
        Some(k) if k.doc.version >= anchor.doc.version => k,
        _ => anchor,
    };
    let (root, rotations) = follow_chain(&start, source)?;
    root.check_fresh(now).map_err(untrusted).context(
        "the root of trust has expired: the operators must publish a new root version (imageupd trust rotate)",
    )?;
    if start.role_keys_changed(&root, "timestamp") {
        // Fast-forward recovery (TUF 5.3.11): the old keys may have signed
        // a huge version; versions start again under the new ones.
        st.index_version = None;
    }
    let bytes = source
        .trust_file(crate::format::tuf::timestamp::FILE_NAME)?
        .ok_or_else(|| {
            anyhow!(
                "the store has no signed index ({}), and this node has a root of trust ({ANCHOR}) that requires one",
                crate::format::tuf::timestamp::FILE_NAME
            )
        })
        .context(ExitKind::Untrusted)?;
    let index = Timestamp::verify(&bytes, &root, st.index_version).map_err(untrusted)?;
    let expired = match index.check_fresh(now) {
        Ok(()) => false,
        Err(e) if allow_expired => {
            tracing::warn!("{e}; accepted because allow_expired_index = true");
            true
        }
        Err(e) => return Err(untrusted(e)).context(
            "a stale index may hide newer images (a freeze attack); refresh it on the publisher \
                 (imageupd trust timestamp) or set allow_expired_index = true to accept it",
        ),
    };
    st.root = Some(String::from_utf8_lossy(&root.bytes).into_owned());
    st.index_version = Some(index.version);
    if let Some(s) = state {
        trust_state::save(s.as_fd(), &st)?;
    }
    let issued = parse_time(&index.issued).map_err(untrusted)?;
    let report = IndexReport {
        root_version: root.doc.version,
        root_rotations: rotations,
        version: index.version,
        issued: format_time(issued),
        expires: index.expires.clone(),
        age_secs: now - issued,
        expired,
        newest_on_channel: None,
    };
    Ok(Some(Verified {
        root,
        index: Some(index),
        report: Some(report),
    }))
}

/// A rollback in place returns to an image this node installed and keeps
/// the record of: no chain walk, no index, no network; its signatures are
/// still checked against the root in force (the newer of the anchor and the
/// root this node followed).
fn offline(anchor: Root, state: Option<&OwnedFd>) -> Result<Verified> {
    let st = match state {
        Some(s) => trust_state::load(s.as_fd())?,
        None => Default::default(),
    };
    let kept = st
        .root
        .as_deref()
        .map(|r| Root::anchor(r.as_bytes()))
        .transpose()
        .map_err(untrusted)?;
    let root = match kept {
        Some(k) if k.doc.version >= anchor.doc.version => k,
        _ => anchor,
    };
    Ok(Verified {
        root,
        index: None,
        report: None,
    })
}

/// Follow the store's `root/<N>.root.json` from `start`, each version
/// checked by [`Root::update`]; the newest root and how many were taken.
fn follow_chain(start: &Root, source: &Source) -> Result<(Root, u64)> {
    let mut root = start.clone();
    let mut rotations = 0;
    while rotations < MAX_ROOT_STEPS {
        let next = format!("root/{}.root.json", root.doc.version + 1);
        let Some(b) = source.trust_file(&next)? else {
            break;
        };
        root = root
            .update(&b)
            .map_err(untrusted)
            .with_context(|| format!("the store's {next}"))?;
        rotations += 1;
    }
    Ok((root, rotations))
}
