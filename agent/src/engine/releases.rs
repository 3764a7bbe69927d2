//! Downgrade protection: the node's high-water mark of release numbers per
//! channel (`var/lib/imageupd/releases.json`), and the rule that an image
//! below it, or for another role, is refused.
//!
//! The marks rise at commit only (an image that was never installed does
//! not raise them) and never fall: `imageupd rollback` and
//! `apply --allow-downgrade` install a lower release without lowering the
//! mark, so the next image the metadata names must again be at least the
//! highest ever installed. A manifest without a release (format 1, or an
//! image directory) counts as release 0 on channel `default`.

use std::collections::BTreeMap;
use std::os::fd::BorrowedFd;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::format::manifest::{Manifest, RelPath, DEFAULT_CHANNEL};
use crate::fs::fsx;

/// File name of the marks in the state directory.
pub const RELEASES_NAME: &[u8] = b"releases.json";
/// Format of [`RELEASES_NAME`].
const MARKS_FORMAT: u32 = 1;

/// The highest release installed on one channel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mark {
    /// Release number.
    pub release: u64,
    /// The image that carried it.
    pub image: String,
}

/// Every channel's mark.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Marks {
    /// Always [`MARKS_FORMAT`].
    pub format: u32,
    /// Channel name to mark.
    pub channels: BTreeMap<String, Mark>,
}

/// Why an image is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// Lower than the node's mark on the channel.
    #[error("image {image:?} is release {release} on channel {channel:?}, below release {mark} (image {mark_image:?}) that this node has installed; refusing a downgrade. To go back on purpose, run `imageupd rollback` or `imageupd apply --allow-downgrade` on the node")]
    Downgrade {
        /// The refused image.
        image: String,
        /// Its channel.
        channel: String,
        /// Its release.
        release: u64,
        /// The node's mark.
        mark: u64,
        /// The image that set the mark.
        mark_image: String,
    },
    /// Signed for another role.
    #[error("image {image:?} is for {found}, but this node is {wanted:?} (key `compatible` in /etc/imageupd/config.toml); refusing it")]
    Incompatible {
        /// The refused image.
        image: String,
        /// What the image says (or "no role").
        found: String,
        /// What the node's configuration says.
        wanted: String,
    },
}

/// An image's channel and release (legacy manifests: `default`, 0).
pub fn release_of(m: &Manifest) -> (&str, u64) {
    (
        m.channel.as_deref().unwrap_or(DEFAULT_CHANNEL),
        m.release.unwrap_or(0),
    )
}

/// Check a verified manifest against the marks and the node's role.
/// `allow_downgrade` is the operator's local intent; it never overrides
/// the role.
pub fn check(
    marks: &Marks,
    m: &Manifest,
    node_compatible: Option<&str>,
    allow_downgrade: bool,
) -> Result<(), Refusal> {
    if let Some(want) = node_compatible {
        if m.compatible.as_deref() != Some(want) {
            return Err(Refusal::Incompatible {
                image: m.id.clone(),
                found: m
                    .compatible
                    .as_ref()
                    .map(|c| format!("{c:?}"))
                    .unwrap_or_else(|| "no role (unset compatible)".into()),
                wanted: want.into(),
            });
        }
    }
    let (channel, release) = release_of(m);
    match marks.channels.get(channel) {
        Some(mark) if release < mark.release && !allow_downgrade => Err(Refusal::Downgrade {
            image: m.id.clone(),
            channel: channel.into(),
            release,
            mark: mark.release,
            mark_image: mark.image.clone(),
        }),
        _ => Ok(()),
    }
}

/// Raise the channel's mark to the manifest's release; true if it changed.
pub fn raise(marks: &mut Marks, m: &Manifest) -> bool {
    let (channel, release) = release_of(m);
    marks.format = MARKS_FORMAT;
    match marks.channels.get(channel) {
        Some(mark) if mark.release >= release => false,
        _ => {
            marks.channels.insert(
                channel.into(),
                Mark {
                    release,
                    image: m.id.clone(),
                },
            );
            true
        }
    }
}

/// The node's marks; none yet is empty. A file that does not parse is an
/// error, never "no marks" (that would allow every downgrade).
pub fn load(state: BorrowedFd<'_>) -> Result<Marks> {
    match fsx::read_beneath(state, &RelPath(RELEASES_NAME.to_vec())) {
        Ok(b) => serde_json::from_slice(&b).context(
            "var/lib/imageupd/releases.json (the release high-water marks) is corrupt; refusing to guess",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Marks::default()),
        Err(e) => Err(e).context("reading var/lib/imageupd/releases.json"),
    }
}

/// Durably store the marks (temp file, fsync, rename, directory fsync).
pub fn save(state: BorrowedFd<'_>, marks: &Marks) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(marks)?;
    fsx::write_atomic(state, RELEASES_NAME, &bytes, 0o644)
        .context("writing var/lib/imageupd/releases.json")
}

/// After a commit of `m`: raise and store the marks if they change.
pub fn record_installed(state: BorrowedFd<'_>, m: &Manifest) -> Result<()> {
    let mut marks = load(state)?;
    if raise(&mut marks, m) {
        save(state, &marks)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, channel: Option<&str>, release: Option<u64>, compat: Option<&str>) -> Manifest {
        Manifest {
            format: if release.is_some() { 2 } else { 1 },
            id: id.into(),
            parent: None,
            created: String::new(),
            kernel: None,
            channel: channel.map(Into::into),
            release,
            compatible: compat.map(Into::into),
            disk: None,
            entries: vec![],
        }
    }

    #[test]
    fn marks_rise_and_never_fall() {
        let mut k = Marks::default();
        assert!(raise(&mut k, &m("a", Some("default"), Some(3), None)));
        assert!(!raise(&mut k, &m("b", Some("default"), Some(2), None)));
        assert!(!raise(&mut k, &m("c", Some("default"), Some(3), None)));
        assert_eq!(k.channels["default"].image, "a");
        assert!(raise(&mut k, &m("d", Some("beta"), Some(1), None)));
        assert_eq!(k.channels.len(), 2);
    }

    #[test]
    fn downgrade_refused_unless_local_intent() {
        let mut k = Marks::default();
        raise(&mut k, &m("v5", Some("default"), Some(5), None));
        let old = m("v4", Some("default"), Some(4), None);
        assert!(matches!(
            check(&k, &old, None, false),
            Err(Refusal::Downgrade { mark: 5, .. })
        ));
        assert_eq!(check(&k, &old, None, true), Ok(()));
        // Same release (re-apply) and higher are fine; other channels too.
        assert_eq!(
            check(&k, &m("v5", Some("default"), Some(5), None), None, false),
            Ok(())
        );
        assert_eq!(
            check(&k, &m("b1", Some("beta"), Some(1), None), None, false),
            Ok(())
        );
        // Legacy images are release 0 on default: refused once a mark exists.
        assert!(check(&k, &m("old", None, None, None), None, false).is_err());
        assert_eq!(
            check(&Marks::default(), &m("old", None, None, None), None, false),
            Ok(())
        );
    }

    #[test]
    fn role_must_match_and_is_never_overridden() {
        let k = Marks::default();
        let img = m("x", Some("default"), Some(1), Some("storage-x86_64"));
        assert!(matches!(
            check(&k, &img, Some("compute-x86_64"), true),
            Err(Refusal::Incompatible { .. })
        ));
        assert!(check(
            &k,
            &m("y", Some("default"), Some(1), None),
            Some("compute-x86_64"),
            false
        )
        .is_err());
        assert_eq!(check(&k, &img, Some("storage-x86_64"), false), Ok(()));
        assert_eq!(check(&k, &img, None, false), Ok(()));
    }
}
