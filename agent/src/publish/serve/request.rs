//! What a request asks for: its path, checked and resolved inside the
//! store (with how it may be cached), and its byte range.

use crate::format::manifest::RelPath;
use crate::fs::store::MARKER;

/// Why a request path is not served.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathRefusal {
    /// Malformed or a traversal attempt (400).
    #[error("bad request path: {0}")]
    Bad(&'static str),
    /// Not something a store publishes (404).
    #[error("not found")]
    NotFound,
}

/// How a served file may be cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheClass {
    /// Named by content or immutable id.
    Immutable,
    /// May change; clients must revalidate.
    Revalidate,
}

/// Map a request's raw (still percent-encoded) path to a path below the
/// store, or refuse it.
pub fn resolve_path(raw: &str) -> Result<(RelPath, CacheClass), PathRefusal> {
    let Some(rest) = raw.strip_prefix('/') else {
        return Err(PathRefusal::Bad("not absolute"));
    };
    let lower = rest.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%00")
        || rest.contains('\\')
    {
        return Err(PathRefusal::Bad("encoded separator or NUL"));
    }
    let decoded = percent_decode(rest).ok_or(PathRefusal::Bad("invalid percent-encoding"))?;
    if decoded.contains(&0) {
        return Err(PathRefusal::Bad("NUL"));
    }
    if decoded.is_empty() {
        return Err(PathRefusal::NotFound);
    }
    let parts: Vec<&[u8]> = decoded.split(|&b| b == b'/').collect();
    for p in &parts {
        match *p {
            b"" => return Err(PathRefusal::Bad("empty path component")),
            b"." | b".." => return Err(PathRefusal::Bad("dot path component")),
            _ if p[0] == b'.' => return Err(PathRefusal::NotFound),
            _ => {}
        }
    }
    let class = match (parts[0], parts.len()) {
        (b"index.json" | b"timestamp.json" | b"root.json", 1) => CacheClass::Revalidate,
        // Root versions never change once published.
        (b"root", 2) => CacheClass::Immutable,
        (top, 1) if top == MARKER.as_bytes() => CacheClass::Revalidate,
        (b"objects" | b"images" | b"packs", n) if n > 1 => CacheClass::Immutable,
        (b"disks", n) if n > 1 => CacheClass::Revalidate,
        _ => return Err(PathRefusal::NotFound),
    };
    Ok((RelPath(decoded), class))
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The outcome of a `Range` header against a file of known length.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// No (usable) range: send the whole file with 200.
    Full,
    /// Send bytes `start..=end` with 206.
    Part {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// 416.
    Unsatisfiable,
}

/// Interpret a `Range` header value. Only a single `bytes` range is
/// honoured; multiple ranges and malformed values are ignored (the whole
/// file is sent), as RFC 9110 allows.
pub fn parse_range(value: &str, len: u64) -> RangeSpec {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeSpec::Full;
    };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last N bytes.
        let Ok(n) = b.parse::<u64>() else {
            return RangeSpec::Full;
        };
        if n == 0 || len == 0 {
            return RangeSpec::Unsatisfiable;
        }
        return RangeSpec::Part {
            start: len.saturating_sub(n),
            end: len - 1,
        };
    }
    let Ok(start) = a.parse::<u64>() else {
        return RangeSpec::Full;
    };
    let end = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(e) if e >= start => e,
            _ => return RangeSpec::Full,
        }
    };
    if start >= len {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Part {
        start,
        end: end.min(len - 1),
    }
}
