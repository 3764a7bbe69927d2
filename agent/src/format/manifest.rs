//! The image manifest: one entry per path of the image, sorted, plus the
//! image's identity and kernel.
//!
//! This module is pure: it parses bytes and renders bytes, and never touches
//! the filesystem. Paths are kept as raw bytes because Linux file names are
//! not necessarily UTF-8; they are rendered as JSON strings when they are
//! valid UTF-8 and as `{"hex": "…"}` otherwise.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod disk;
mod lines;
mod values;
pub use disk::{check_disk_name, DiskArtifact, DiskFormat, DISKS_DIR, SHA256SUMS};
pub use lines::{parse_lines, LinesError};
pub use values::{tree_order, Digest, FileType, RawBytes, RelPath, XattrValue, Xattrs};

/// Manifest format version written by this build: 2 adds the signed
/// `channel`, `release` and `compatible` (downgrade protection). Readers
/// accept it and [`LEGACY_FORMAT`], and refuse any other; imageupd builds
/// that read only version 1 refuse version 2 with "format version 2 is not
/// supported".
pub const FORMAT_VERSION: u32 = 2;

/// The format before release numbers: such a manifest counts as release 0
/// on channel [`DEFAULT_CHANNEL`] (see `crate::engine::releases`).
pub const LEGACY_FORMAT: u32 = 1;

/// The channel of an image published without `--channel`.
pub const DEFAULT_CHANNEL: &str = "default";

/// Upper bound on a decompressed manifest, in bytes (512 MiB): a guard against
/// decompression bombs from an untrusted store.
pub const MAX_MANIFEST_BYTES: u64 = 512 << 20;

/// The path of the image's top directory in the manifest.
pub const ROOT_PATH: &[u8] = b".";

/// Errors a caller can match on when reading a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The bytes are not a manifest at all.
    #[error("manifest is not valid JSON: {0}")]
    Syntax(#[from] serde_json::Error),
    /// A manifest from a newer (or older, unsupported) imageupd.
    #[error("manifest format version {found} is not supported (this imageupd reads versions {LEGACY_FORMAT} and {FORMAT_VERSION}); upgrade imageupd or republish the image")]
    UnknownVersion {
        /// The version the manifest declares.
        found: u32,
    },
    /// An entry's path is unsafe or malformed.
    #[error("manifest entry {path:?} is rejected: {why}")]
    BadPath {
        /// The offending path, lossily printed.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An entry is internally inconsistent.
    #[error("manifest entry {path:?} is invalid: {why}")]
    BadEntry {
        /// The offending path, lossily printed.
        path: String,
        /// What is wrong with it.
        why: String,
    },
}

/// One path of the image with every attribute a root filesystem has.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Relative path (`.` for the top directory).
    pub path: RelPath,
    /// Object type.
    #[serde(rename = "type")]
    pub ftype: FileType,
    /// Permission bits including setuid/setgid/sticky (`0o7777` mask).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Content size in bytes (regular files only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// sha256 of the content (regular files only); it also names the
    /// content's object in the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
    /// Symlink target, or for a hardlink the path of the file it links to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<RawBytes>,
    /// Device number (char/block devices only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<u64>,
    /// All extended attributes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: Xattrs,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The kernel an image boots.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelInfo {
    /// Kernel release (`uname -r` once booted), from `/lib/modules/<release>`.
    pub release: String,
    /// Path of the kernel image inside the image, e.g. `boot/vmlinuz-6.1.0-50-cloud-amd64`.
    pub vmlinuz: Option<RelPath>,
    /// sha256 of the kernel image.
    pub vmlinuz_sha256: Option<Digest>,
    /// Path of the initrd inside the image.
    pub initrd: Option<RelPath>,
    /// sha256 of the initrd.
    pub initrd_sha256: Option<Digest>,
}

/// A complete image description.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version; see [`FORMAT_VERSION`].
    pub format: u32,
    /// The operator-chosen image id.
    pub id: String,
    /// The image this one was published as a successor of, if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// Creation time, RFC 3339.
    pub created: String,
    /// The image's kernel, when it carries one.
    #[serde(default)]
    pub kernel: Option<KernelInfo>,
    /// Release channel (format 2; required there, absent in format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// Release number on the channel, increasing with every publish
    /// (format 2; required there, absent in format 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// The node role the image is for (e.g. `compute-x86_64`); a node whose
    /// configuration names a role refuses an image for another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compatible: Option<String>,
    /// The whole-disk image the image was published from (format 2 only;
    /// absent for trees and archives, and in manifests written before it
    /// existed): its name, format, size and digest, signed with the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskArtifact>,
    /// Every path of the image, sorted by [`RelPath::tree_cmp`].
    pub entries: Vec<Entry>,
}

/// The parent of a non-root path, as bytes (`.` for a top-level name).
fn parent_bytes(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|&b| b == b'/') {
        Some(i) => &p[..i],
        None => ROOT_PATH,
    }
}

/// Check an image id: case-sensitive, usable as a file name and URL segment.
pub fn validate_image_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:+".contains(&b))
        && !id.starts_with('.')
        && id.as_bytes()[0] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!(
            "image id {id:?} is invalid: use 1-128 characters from A-Z a-z 0-9 . _ - : +, not starting with '.' or '-'"
        ))
    }
}

/// The image id in a manifest's JSON head, the first line (everything
/// before the first entry, as [`Manifest::to_json`] writes it), without
/// parsing the entries; `None` when the JSON does not start that way or
/// the id is invalid.
pub fn id_of_head(json: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Head {
        id: String,
    }
    let line = &json[..json.iter().position(|&b| b == b'\n')?];
    if !line.ends_with(b"\"entries\":[") {
        return None;
    }
    let mut head = line.to_vec();
    head.extend_from_slice(b"]}");
    let h: Head = serde_json::from_slice(&head).ok()?;
    validate_image_id(&h.id).ok()?;
    Some(h.id)
}

/// Check a channel or compatible label: 1-64 characters of A-Z a-z 0-9 . _ -.
pub fn validate_label(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -"
        ))
    }
}

impl Manifest {
    /// Parse and fully validate a manifest from JSON bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        #[derive(Deserialize)]
        struct VersionProbe {
            format: u32,
        }
        // One pass in the common case; the version is probed on its own only
        // when the full parse fails, so that a manifest of another format
        // version is reported as such rather than as a shape error.
        let m: Manifest = match serde_json::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => {
                let probe: VersionProbe = serde_json::from_slice(bytes)?;
                if probe.format != FORMAT_VERSION && probe.format != LEGACY_FORMAT {
                    return Err(ManifestError::UnknownVersion {
                        found: probe.format,
                    });
                }
                return Err(e.into());
            }
        };
        if m.format != FORMAT_VERSION && m.format != LEGACY_FORMAT {
            return Err(ManifestError::UnknownVersion { found: m.format });
        }
        m.validate()?;
        Ok(m)
    }

    /// Render as JSON bytes (one entry per line, to keep diffs readable).
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 160 + 512);
        let mut head = serde_json::Map::new();
        head.insert("format".into(), self.format.into());
        head.insert("id".into(), self.id.clone().into());
        head.insert(
            "parent".into(),
            serde_json::to_value(&self.parent).unwrap_or_default(),
        );
        head.insert("created".into(), self.created.clone().into());
        head.insert(
            "kernel".into(),
            serde_json::to_value(&self.kernel).unwrap_or_default(),
        );
        if let Some(c) = &self.channel {
            head.insert("channel".into(), c.clone().into());
        }
        if let Some(r) = self.release {
            head.insert("release".into(), r.into());
        }
        if let Some(c) = &self.compatible {
            head.insert("compatible".into(), c.clone().into());
        }
        if let Some(d) = &self.disk {
            head.insert("disk".into(), serde_json::to_value(d).unwrap_or_default());
        }
        let head = serde_json::to_vec(&serde_json::Value::Object(head)).unwrap_or_default();
        // Splice the entries in before the closing brace of the head object.
        out.extend_from_slice(&head[..head.len() - 1]);
        out.extend_from_slice(b",\"entries\":[\n");
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b",\n");
            }
            // Serialising plain data into a Vec cannot fail.
            out.extend_from_slice(&serde_json::to_vec(e).unwrap_or_default());
        }
        out.extend_from_slice(b"\n]}\n");
        out
    }

    /// Validate paths, ordering, hardlink targets and per-type fields.
    pub fn validate(&self) -> Result<(), ManifestError> {
        validate_image_id(&self.id).map_err(|why| ManifestError::BadEntry {
            path: "<id>".into(),
            why,
        })?;
        if let Some(p) = &self.parent {
            validate_image_id(p).map_err(|why| ManifestError::BadEntry {
                path: "<parent>".into(),
                why,
            })?;
        }
        self.validate_release()?;
        // Entries are checked to be in tree order, so each one's parent is
        // on the chain of the previous one's ancestors: a stack, instead of
        // a map of every path (this runs on every resolve).
        let mut prev: Option<&RelPath> = None;
        let mut chain: Vec<(&[u8], FileType)> = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            let bad = |why: &'static str| ManifestError::BadPath {
                path: e.path.display(),
                why,
            };
            e.path.validate().map_err(bad)?;
            if let Some(p) = prev {
                if p.tree_cmp(&e.path) != std::cmp::Ordering::Less {
                    return Err(bad("entries are not sorted or contain duplicates"));
                }
            } else if !e.path.is_root() {
                return Err(bad("the first entry must be the top directory '.'"));
            }
            if !e.path.is_root() {
                let parent = parent_bytes(&e.path.0);
                while chain.last().is_some_and(|(p, _)| *p != parent) {
                    chain.pop();
                }
                match chain.last() {
                    Some((_, FileType::Dir)) => {}
                    Some(_) => {
                        return Err(bad(
                            "parent is not a directory (path escapes through a non-directory)",
                        ))
                    }
                    None => return Err(bad("parent directory is missing from the manifest")),
                }
            }
            e.check_fields()?;
            if e.ftype == FileType::Hardlink {
                let t = RelPath(e.target.as_ref().map(|t| t.0.clone()).unwrap_or_default());
                t.validate().map_err(bad)?;
                let earlier = &self.entries[..i];
                let file = earlier
                    .binary_search_by(|x| x.path.tree_cmp(&t))
                    .is_ok_and(|j| earlier[j].ftype == FileType::File);
                if !file {
                    return Err(bad("hardlink target is not a regular file listed earlier"));
                }
            }
            chain.push((&e.path.0, e.ftype));
            prev = Some(&e.path);
        }
        if self.entries.is_empty() {
            return Err(ManifestError::BadEntry {
                path: ".".into(),
                why: "manifest has no entries".into(),
            });
        }
        if self.entries[0].ftype != FileType::Dir {
            return Err(ManifestError::BadEntry {
                path: ".".into(),
                why: "top entry is not a directory".into(),
            });
        }
        Ok(())
    }

    /// Format 2 carries a channel and a release, format 1 neither (nor a
    /// disk); names are short identifiers, a disk's file name a safe one.
    fn validate_release(&self) -> Result<(), ManifestError> {
        let bad = |why: String| ManifestError::BadEntry {
            path: "<release>".into(),
            why,
        };
        let legacy = self.format == LEGACY_FORMAT;
        if legacy && (self.channel.is_some() || self.release.is_some() || self.compatible.is_some())
        {
            return Err(bad(
                "a format 1 manifest carries no channel, release or compatible".into(),
            ));
        }
        if !legacy && (self.channel.is_none() || self.release.is_none()) {
            return Err(bad(format!(
                "a format {} manifest needs a channel and a release",
                self.format
            )));
        }
        for (what, v) in [("channel", &self.channel), ("compatible", &self.compatible)] {
            if let Some(v) = v {
                validate_label(v).map_err(|e| bad(format!("{what}: {e}")))?;
            }
        }
        if let Some(d) = &self.disk {
            if legacy {
                return Err(bad("a format 1 manifest carries no disk".into()));
            }
            d.validate().map_err(|e| bad(format!("disk: {e}")))?;
        }
        Ok(())
    }

    /// The entry at `path`: a binary search in tree order
    /// ([`RelPath::tree_cmp`]), the order entries are kept in. (Byte order
    /// is not that order: `a-b` sorts before `a/c` bytewise but after it in
    /// the tree, so a bytewise search misses entries near such names.)
    pub fn entry(&self, path: &RelPath) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.tree_cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Total content bytes of regular files.
    pub fn content_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.ftype == FileType::File)
            .map(|e| e.size)
            .sum()
    }
}

impl Entry {
    fn check_fields(&self) -> Result<(), ManifestError> {
        let bad = |why: String| ManifestError::BadEntry {
            path: self.path.display(),
            why,
        };
        if self.mode & !0o7777 != 0 {
            return Err(bad(format!("mode {:o} has bits outside 07777", self.mode)));
        }
        match self.ftype {
            FileType::File => {
                if self.sha256.is_none() {
                    return Err(bad("regular file without sha256".into()));
                }
            }
            FileType::Symlink => {
                let t = self
                    .target
                    .as_ref()
                    .ok_or_else(|| bad("symlink without target".into()))?;
                if t.0.is_empty() || t.0.contains(&0) {
                    return Err(bad("symlink target empty or contains NUL".into()));
                }
            }
            FileType::Hardlink => {
                if self.target.is_none() {
                    return Err(bad("hardlink without target".into()));
                }
            }
            FileType::Char | FileType::Block => {
                if self.rdev.is_none() {
                    return Err(bad("device without rdev".into()));
                }
            }
            FileType::Dir | FileType::Fifo | FileType::Socket => {}
        }
        if self.ftype != FileType::File && (self.size != 0 || self.sha256.is_some()) {
            return Err(bad("size/sha256 on a non-file".into()));
        }
        for name in self.xattrs.keys() {
            if name.0.is_empty() || name.0.contains(&0) {
                return Err(bad("empty or NUL-containing xattr name".into()));
            }
        }
        Ok(())
    }

    /// True when metadata that rename-free updates can fix (owner, mode,
    /// xattrs, mtime) is equal.
    pub fn same_meta(&self, other: &Entry) -> bool {
        self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && self.mtime_ns == other.mtime_ns
            && self.xattrs == other.xattrs
    }
}

#[cfg(test)]
mod tests;
