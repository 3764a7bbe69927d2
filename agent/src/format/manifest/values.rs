//! The value types of a manifest: paths and other raw bytes (JSON strings
//! when UTF-8, `{"hex": ...}` otherwise), xattrs, file types and digests.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ROOT_PATH;

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
        tree_order(&self.0, &other.0)
    }
}

/// [`RelPath::tree_cmp`] on raw path bytes. Comparing component by
/// component is comparing bytes with `/` below every other byte (a name
/// holds neither `/` nor NUL), which needs no splitting: this runs once
/// per entry in every manifest check and plan.
pub fn tree_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a == ROOT_PATH, b == ROOT_PATH) {
        (true, true) => return Ordering::Equal,
        (true, false) => return Ordering::Less,
        (false, true) => return Ordering::Greater,
        _ => {}
    }
    let n = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    match (a.get(n), b.get(n)) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Less,
        (Some(_), None) => Ordering::Greater,
        (Some(&x), Some(&y)) => {
            let key = |c: u8| if c == b'/' { 0 } else { c };
            key(x).cmp(&key(y))
        }
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

/// The value of each byte as a hex digit (either case); 255 for a byte
/// that is not one.
const HEX_VALUE: [u8; 256] = {
    let mut t = [255u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl Digest {
    /// Lowercase hex form (the object name).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parse 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, String> {
        // A table lookup per digit and no allocation: a manifest holds one
        // digest per file, and parsing them was a tenth of a plan's time.
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(format!("bad sha256 {s:?}: not 32 bytes"));
        }
        let mut arr = [0u8; 32];
        for (out, pair) in arr.iter_mut().zip(b.chunks_exact(2)) {
            let (hi, lo) = (HEX_VALUE[pair[0] as usize], HEX_VALUE[pair[1] as usize]);
            if hi > 15 || lo > 15 {
                return Err(format!("bad sha256 {s:?}: not hex"));
            }
            *out = (hi << 4) | lo;
        }
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
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256 as 64 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Digest, E> {
                Digest::from_hex(s).map_err(E::custom)
            }
        }
        // Borrowed from the input where it can be: no String per digest.
        d.deserialize_str(V)
    }
}
