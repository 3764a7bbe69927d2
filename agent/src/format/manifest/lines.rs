//! Parsing a manifest one line at a time, as [`Manifest::to_json`] lays it
//! out (the head, then one entry per line): the decompressed JSON is never
//! held whole, which at a million entries is some 180 MB.
//!
//! Only that exact layout is read this way; anything else (another
//! writer's whitespace, a damaged file) returns `None` and the caller
//! parses the whole document instead, so what is accepted and every error
//! a caller sees are exactly those of [`Manifest::parse`].

use std::io::{BufRead, Read};

use serde::Deserialize;

use super::{
    DiskArtifact, Entry, KernelInfo, Manifest, ManifestError, FORMAT_VERSION, LEGACY_FORMAT,
};

/// The end of the head line.
const HEAD_END: &[u8] = b",\"entries\":[\n";
/// The last line.
const TAIL: &[u8] = b"]}\n";

/// Everything of a manifest but its entries.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    format: u32,
    id: String,
    #[serde(default)]
    parent: Option<String>,
    created: String,
    #[serde(default)]
    kernel: Option<KernelInfo>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    release: Option<u64>,
    #[serde(default)]
    compatible: Option<String>,
    #[serde(default)]
    disk: Option<DiskArtifact>,
}

/// Why a line-by-line read gave up.
pub enum LinesError {
    /// Not the canonical layout (or not valid): parse the whole document.
    NotCanonical,
    /// Reading failed, or the document is longer than allowed.
    Read(std::io::Error),
}

impl From<std::io::Error> for LinesError {
    fn from(e: std::io::Error) -> Self {
        LinesError::Read(e)
    }
}

/// Parse and validate a manifest from `r`, reading at most `max` bytes.
pub fn parse_lines(mut r: impl BufRead, max: u64) -> Result<Manifest, LinesError> {
    let mut line = Vec::with_capacity(4096);
    let mut total = 0u64;
    let mut next = |line: &mut Vec<u8>| -> Result<usize, LinesError> {
        line.clear();
        // Bounded as it is read: a line of zeros from a zstd bomb has no end.
        let room = max.saturating_sub(total).saturating_add(1);
        let n = r.by_ref().take(room).read_until(b'\n', line)?;
        total += n as u64;
        if total > max {
            return Err(LinesError::Read(std::io::Error::other(format!(
                "manifest decompresses to more than {max} bytes; refused"
            ))));
        }
        Ok(n)
    };
    next(&mut line)?;
    let Some(head) = line.strip_suffix(HEAD_END) else {
        return Err(LinesError::NotCanonical);
    };
    let mut head_json = head.to_vec();
    head_json.push(b'}');
    let h: Head = serde_json::from_slice(&head_json).map_err(|_| LinesError::NotCanonical)?;
    if h.format != FORMAT_VERSION && h.format != LEGACY_FORMAT {
        return Err(LinesError::NotCanonical);
    }
    let mut entries = Vec::new();
    loop {
        if next(&mut line)? == 0 {
            return Err(LinesError::NotCanonical);
        }
        // (`,\n]}` would be a trailing comma: not JSON.)
        if line == TAIL {
            return Err(LinesError::NotCanonical);
        }
        let body = match line.strip_suffix(b",\n") {
            Some(b) => b,
            None => line.strip_suffix(b"\n").ok_or(LinesError::NotCanonical)?,
        };
        let last = body.len() + 1 == line.len();
        let e: Entry = serde_json::from_slice(body).map_err(|_| LinesError::NotCanonical)?;
        entries.push(e);
        if last {
            // The last entry is followed by the tail and nothing else.
            if next(&mut line)? == 0 || line != TAIL || next(&mut line)? != 0 {
                return Err(LinesError::NotCanonical);
            }
            break;
        }
    }
    if next(&mut line)? != 0 {
        return Err(LinesError::NotCanonical);
    }
    let m = Manifest {
        format: h.format,
        id: h.id,
        parent: h.parent,
        created: h.created,
        kernel: h.kernel,
        channel: h.channel,
        release: h.release,
        compatible: h.compatible,
        disk: h.disk,
        entries,
    };
    m.validate()
        .map_err(|_: ManifestError| LinesError::NotCanonical)?;
    Ok(m)
}
