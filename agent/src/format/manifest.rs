//! The image manifest: one entry per path of the image, sorted, plus the
//! image's identity and kernel.
//!
//! This module is pure: it parses bytes and renders bytes, and never touches
//! the filesystem. Paths are kept as raw bytes because Linux file names are
//! not necessarily UTF-8; they are rendered as JSON strings when they are
//! valid UTF-8 and as `{"hex": "…"}` otherwise.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Manifest format version written by this build. Readers refuse any other.
pub const FORMAT_VERSION: u32 = 1;

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
    #[error("manifest format version {found} is not supported (this imageupd reads version {FORMAT_VERSION}); upgrade imageupd or republish the image")]
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

/// A relative, normalised path inside an image, as raw bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelPath(pub Vec<u8>);

impl RelPath {
    /// The path of the image's top directory.
    pub fn root() -> Self {
        RelPath(ROOT_PATH.to_vec())
    }

    /// True for the image's top directory.
    pub fn is_root(&self) -> bool {
        self.0 == ROOT_PATH
    }

    /// Raw bytes of the path.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path as an OS path fragment (relative).
    pub fn as_os_str(&self) -> &std::ffi::OsStr {
        use std::os::unix::ffi::OsStrExt;
        std::ffi::OsStr::from_bytes(&self.0)
    }

    /// Lossy display form, for messages.
    pub fn display(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// Parent path (`.` for top-level names); `None` for the root itself.
    pub fn parent(&self) -> Option<RelPath> {
        if self.is_root() {
            return None;
        }
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => Some(RelPath(self.0[..i].to_vec())),
            None => Some(RelPath::root()),
        }
    }

    /// Last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// Join a single component.
    pub fn join(&self, name: &[u8]) -> RelPath {
        if self.is_root() {
            RelPath(name.to_vec())
        } else {
            let mut v = Vec::with_capacity(self.0.len() + 1 + name.len());
            v.extend_from_slice(&self.0);
            v.push(b'/');
            v.extend_from_slice(name);
            RelPath(v)
        }
    }

    /// Number of components (0 for the root).
    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            self.0.iter().filter(|&&b| b == b'/').count() + 1
        }
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        if other.is_root() {
            return true;
        }
        self.0.starts_with(&other.0)
            && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }

    /// Check that the path is relative, normalised and free of traversal.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.is_root() {
            return Ok(());
        }
        let b = &self.0;
        if b.is_empty() {
            return Err("empty path");
        }
        if b.contains(&0) {
            return Err("path contains NUL");
        }
        if b[0] == b'/' {
            return Err("absolute path");
        }
        for comp in b.split(|&c| c == b'/') {
            match comp {
                b"" => return Err("empty component (double or trailing slash)"),
                b"." => return Err("'.' component"),
                b".." => return Err("'..' component"),
                _ => {}
            }
        }
        Ok(())
    }

    /// Sort key that orders a directory immediately before its contents
    /// (plain byte order would put `a.b` between `a` and `a/b`).
    pub fn tree_cmp(&self, other: &RelPath) -> std::cmp::Ordering {
        match (self.is_root(), other.is_root()) {
            (true, true) => return std::cmp::Ordering::Equal,
            (true, false) => return std::cmp::Ordering::Less,
            (false, true) => return std::cmp::Ordering::Greater,
            (false, false) => {}
        }
        let a = self.0.split(|&c| c == b'/');
        let b = other.0.split(|&c| c == b'/');
        a.cmp(b)
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.display())
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("/")
        } else {
            write!(f, "/{}", self.display())
        }
    }
}

/// Bytes rendered as a UTF-8 string when possible, else as `{"hex": "…"}`.
#[derive(Serialize)]
struct HexRepr {
    hex: String,
}

fn ser_bytes<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
    match std::str::from_utf8(b) {
        Ok(t) => s.serialize_str(t),
        Err(_) => HexRepr {
            hex: hex::encode(b),
        }
        .serialize(s),
    }
}

/// Accepts a string or `{"hex": "…"}` without buffering (serde's untagged
/// enums buffer every value, which dominated manifest parsing).
struct BytesVisitor;

impl<'de> serde::de::Visitor<'de> for BytesVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or {\"hex\": \"...\"}")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
        Ok(v.as_bytes().to_vec())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Vec<u8>, E> {
        Ok(v.into_bytes())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Vec<u8>, A::Error> {
        let mut out = None;
        while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if k != "hex" || out.is_some() {
                return Err(serde::de::Error::custom(format!(
                    "unexpected key {k:?} in a byte string"
                )));
            }
            let h: std::borrow::Cow<'de, str> = map.next_value()?;
            out = Some(hex::decode(h.as_bytes()).map_err(serde::de::Error::custom)?);
        }
        out.ok_or_else(|| serde::de::Error::custom("missing \"hex\""))
    }
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    d.deserialize_any(BytesVisitor)
}

impl Serialize for RelPath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ser_bytes(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for RelPath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_bytes(d).map(RelPath)
    }
}

/// Raw bytes (symlink targets, xattr names) with the same rendering as paths.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct RawBytes(pub Vec<u8>);

impl Serialize for RawBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ser_bytes(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for RawBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de_bytes(d).map(RawBytes)
    }
}

/// Extended-attribute value, always base64 (values are binary, e.g.
/// `security.capability`).
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct XattrValue(pub Vec<u8>);

impl Serialize for XattrValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for XattrValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map(XattrValue)
            .map_err(serde::de::Error::custom)
    }
}

/// The xattrs of one entry, by name.
pub type Xattrs = BTreeMap<RawBytes, XattrValue>;

/// What kind of filesystem object an entry is.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    /// Regular file with content.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Another name for the regular file at `target`.
    Hardlink,
    /// Character device.
    Char,
    /// Block device.
    Block,
    /// Named pipe.
    Fifo,
    /// Unix socket node.
    Socket,
}

impl FileType {
    /// Short human label.
    pub fn label(self) -> &'static str {
        match self {
            FileType::File => "file",
            FileType::Dir => "directory",
            FileType::Symlink => "symlink",
            FileType::Hardlink => "hardlink",
            FileType::Char => "char device",
            FileType::Block => "block device",
            FileType::Fifo => "fifo",
            FileType::Socket => "socket",
        }
    }
}

/// A 32-byte sha256 digest, rendered as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Lowercase hex form (the object name).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let v = hex::decode(s).map_err(|e| format!("bad sha256 {s:?}: {e}"))?;
        let arr: [u8; 32] = v
            .try_into()
            .map_err(|_| format!("bad sha256 {s:?}: not 32 bytes"))?;
        Ok(Digest(arr))
    }

    /// Digest of a byte slice.
    pub fn of(data: &[u8]) -> Self {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(data).into())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).map_err(serde::de::Error::custom)
    }
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
    /// Every path of the image, sorted by [`RelPath::tree_cmp`].
    pub entries: Vec<Entry>,
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
                if probe.format != FORMAT_VERSION {
                    return Err(ManifestError::UnknownVersion {
                        found: probe.format,
                    });
                }
                return Err(e.into());
            }
        };
        if m.format != FORMAT_VERSION {
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
        let mut prev: Option<&RelPath> = None;
        let mut types: crate::sys::fastmap::HashMap<&RelPath, FileType> =
            crate::sys::fastmap::HashMap::default();
        for e in &self.entries {
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
            if let Some(parent) = e.path.parent() {
                match types.get(&parent) {
                    Some(FileType::Dir) => {}
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
                if types.get(&t) != Some(&FileType::File) {
                    return Err(bad("hardlink target is not a regular file listed earlier"));
                }
            }
            types.insert(&e.path, e.ftype);
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
