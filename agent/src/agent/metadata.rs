//! Node metadata (SPEC §6): where the agent and `apply --from-metadata` learn
//! which image the node should run.
//!
//! Two halves:
//!
//! - **Pure**: [`deep_merge`], [`merge_all`], [`lookup`] and [`render_raw`]
//!   reproduce os-apply-config 14.1.0 exactly (`collect_config.py`'s
//!   `_deep_merge_dict`/`merge_configs`, `apply_config.py`'s `_extract_key`
//!   and `print_key`): later files win, nested objects merge key by key, any
//!   non-object replaces, top levels that are not objects are ignored;
//!   `--key a.b.0.c` walks objects and list indexes and `null` counts as
//!   missing. `tests/metadata_parity.rs` checks this against the real tool.
//! - **I/O edge**: [`MetadataSource::read`] finds the files (os-collect-config's
//!   `os_config_files.json`, or `$OS_CONFIG_FILES`, or one plain JSON file),
//!   reads and merges them. A half-written or invalid file is an error the
//!   caller reports; it never becomes an empty document that could trigger
//!   (or hide) an update.
//!
//! Metadata paths are host paths, not re-rooted under `--root`: the metadata
//! is written by tools that run on the host (os-collect-config), it is not
//! part of any image.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Map, Value};

pub use crate::engine::config::{
    MetadataSource, DEFAULT_IMAGE_ID_KEY, DEFAULT_IMAGE_SOURCE_KEY, DEFAULT_OCC_CACHE_DIR,
};

/// The file in the cache directory that lists the cached files in merge order.
pub const OS_CONFIG_FILES_JSON: &str = "os_config_files.json";
/// The environment variable os-collect-config sets for its command: the
/// cached files, colon-separated, in merge order. Overrides the list file.
pub const OS_CONFIG_FILES_ENV: &str = "OS_CONFIG_FILES";
/// Files os-apply-config merges *before* the listed ones (its default
/// `--fallback-metadata`), when they exist; kept for parity.
pub const FALLBACK_METADATA: [&str; 3] = [
    "/var/cache/heat-cfntools/last_metadata",
    "/var/lib/heat-cfntools/cfn-init-data",
    "/var/lib/cloud/data/cfn-init-data",
];

/// `_deep_merge_dict(a, b)`: `b` over `a`. A non-object `b` replaces `a`
/// wholesale; keys of `b` whose value in `a` is an object merge recursively,
/// all others are replaced (including by `null`).
pub fn deep_merge(a: &Value, b: &Value) -> Value {
    let Value::Object(bm) = b else {
        return b.clone();
    };
    // Python deep-copies `a` whatever it is and indexes it as a dict; `a` is
    // only ever an object here (merge_all starts from {} and recursion only
    // happens on objects), but stay total.
    let mut out: Map<String, Value> = match a {
        Value::Object(am) => am.clone(),
        _ => Map::new(),
    };
    for (k, v) in bm {
        let merged = match out.get(k) {
            Some(old @ Value::Object(_)) => deep_merge(old, v),
            _ => v.clone(),
        };
        out.insert(k.clone(), merged);
    }
    Value::Object(out)
}

/// `merge_configs`: merge documents in order, later winning. Documents whose
/// top level is not an object, or is an empty object, are ignored.
pub fn merge_all<'a, I: IntoIterator<Item = &'a Value>>(docs: I) -> Value {
    let mut acc = Value::Object(Map::new());
    for d in docs {
        if matches!(d, Value::Object(m) if !m.is_empty()) {
            acc = deep_merge(&acc, d);
        }
    }
    acc
}

/// `_extract_key`: the value at dotted `key`, or `None` when any step is
/// missing or `null`. A step into a list is a Python `int()` of the segment,
/// so `-1` is the last element and ` 2 `, `+2` and `0_2` work as in Python.
pub fn lookup<'a>(doc: &'a Value, key: &str) -> Option<&'a Value> {
    let mut cur = doc;
    for seg in key.split('.') {
        let next = match cur {
            Value::Object(m) => m.get(seg),
            Value::Array(list) => py_int(seg).and_then(|i| {
                let len = i64::try_from(list.len()).ok()?;
                let idx = if i < 0 { i + len } else { i };
                usize::try_from(idx).ok().and_then(|u| list.get(u))
            }),
            _ => None,
        };
        match next {
            Some(Value::Null) | None => return None,
            Some(v) => cur = v,
        }
    }
    Some(cur)
}

/// How `os-apply-config --key K --type raw` prints a found value: strings
/// raw, objects, lists and booleans as JSON, numbers as Python's `str()`.
///
/// Objects print with Python's `", "`/`": "` separators; key order follows
/// serde_json's map (sorted), so compare objects by value, not by text.
pub fn render_raw(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => py_number(n),
        Value::Null => "None".to_owned(),
        other => py_json(other),
    }
}

fn py_number(n: &serde_json::Number) -> String {
    if n.is_f64() {
        let f = n.as_f64().unwrap_or(0.0);
        // Python's repr: shortest round-trip, with ".0" on integral values
        // and exponent form outside [1e-4, 1e16).
        let a = f.abs();
        if a != 0.0 && !(1e-4..1e16).contains(&a) {
            let s = format!("{f:e}");
            let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
            let exp: i32 = e.parse().unwrap_or(0);
            format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
        } else if f.fract() == 0.0 {
            format!("{f:.1}")
        } else {
            format!("{f}")
        }
    } else {
        n.to_string()
    }
}

/// `json.dumps` with its defaults: `", "` and `": "`, ASCII only.
fn py_json(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            if n.is_f64() {
                py_number(n)
            } else {
                n.to_string()
            }
        }
        Value::String(s) => py_str(s),
        Value::Array(a) => format!("[{}]", a.iter().map(py_json).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", py_str(k), py_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn py_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Python's `int(str)` for ASCII input: surrounding whitespace, an optional
/// sign, digits with single underscores between them.
fn py_int(s: &str) -> Option<i64> {
    let t = s.trim_matches(|c: char| c.is_ascii_whitespace() || c == '\x0b' || c == '\x0c');
    let (neg, digits) = match t.as_bytes().first()? {
        b'-' => (true, &t[1..]),
        b'+' => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let clean: String = digits.chars().filter(|&c| c != '_').collect();
    if !clean.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Out-of-range indexes are IndexError in Python: missing, like here.
    let n: i64 = clean.parse().ok()?;
    Some(if neg { -n } else { n })
}

/// Why metadata could not be used. The caller reports it and does not act.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// A metadata or list file exists but could not be read.
    #[error("cannot read metadata file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid JSON (possibly half-written).
    #[error("metadata file {} is not valid JSON ({msg}); it may be half-written, so it is ignored until it parses", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        msg: String,
    },
    /// The list file does not hold a JSON list of paths.
    #[error("{} does not hold a JSON list of file paths", .path.display())]
    NotAList {
        /// The list file.
        path: PathBuf,
    },
    /// A plain metadata file whose top level is not a JSON object.
    #[error("metadata file {} must hold a JSON object at its top level", .path.display())]
    NotAnObject {
        /// The file.
        path: PathBuf,
    },
    /// A key holds something that cannot be an image id or source.
    #[error("metadata key {key:?} holds {value}, which is not a usable {what}: {why}")]
    BadValue {
        /// The dotted key.
        key: String,
        /// The value, rendered.
        value: String,
        /// "image id" or "image source".
        what: &'static str,
        /// Why not.
        why: String,
    },
}

/// One consistent read of the metadata.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The merged document.
    pub doc: Value,
    /// The files that existed and were merged, in order.
    pub files: Vec<PathBuf>,
    /// Newest modification time among the merged files and the list file:
    /// when the metadata last changed.
    pub changed_at: Option<SystemTime>,
}

/// What the metadata asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The target image id.
    pub id: String,
    /// The store to take it from, if the metadata names one.
    pub source: Option<String>,
}

impl MetadataSource {
    /// The cached files' list file, for the OCC source.
    pub fn list_file(&self) -> Option<PathBuf> {
        match self {
            MetadataSource::Occ {
                cache_dir,
                env_files: None,
            } => Some(cache_dir.join(OS_CONFIG_FILES_JSON)),
            _ => None,
        }
    }

    /// One line for logs and status.
    pub fn describe(&self) -> String {
        match self {
            MetadataSource::Occ {
                env_files: Some(v), ..
            } => format!("os-collect-config files from ${OS_CONFIG_FILES_ENV} ({v})"),
            MetadataSource::Occ { cache_dir, .. } => format!(
                "os-collect-config cache {}",
                cache_dir.join(OS_CONFIG_FILES_JSON).display()
            ),
            MetadataSource::File(p) => format!("metadata file {}", p.display()),
        }
    }

    /// The files to merge, in order (existing or not), as os-apply-config
    /// would list them.
    pub fn files(&self) -> Result<Vec<PathBuf>, MetadataError> {
        match self {
            MetadataSource::File(p) => Ok(vec![p.clone()]),
            MetadataSource::Occ {
                env_files: Some(v), ..
            } => Ok(v
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
                .collect()),
            MetadataSource::Occ {
                cache_dir,
                env_files: None,
            } => {
                let list = cache_dir.join(OS_CONFIG_FILES_JSON);
                let Some(bytes) = read_opt(&list)? else {
                    return Ok(Vec::new());
                };
                let v: Value =
                    serde_json::from_slice(&bytes).map_err(|e| MetadataError::Invalid {
                        path: list.clone(),
                        msg: e.to_string(),
                    })?;
                let Value::Array(items) = v else {
                    return Err(MetadataError::NotAList { path: list });
                };
                let mut out = Vec::with_capacity(items.len());
                for it in items {
                    match it {
                        Value::String(s) if !s.is_empty() => out.push(PathBuf::from(s)),
                        Value::String(_) => {}
                        _ => return Err(MetadataError::NotAList { path: list }),
                    }
                }
                Ok(out)
            }
        }
    }

    /// Directories whose changes may change the metadata: what to watch.
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut add = |p: &Path| {
            if let Some(d) = p.parent() {
                let d = if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                };
                if !dirs.iter().any(|x| x == d) {
                    dirs.push(d.to_path_buf());
                }
            }
        };
        match self {
            MetadataSource::File(p) => add(p),
            MetadataSource::Occ {
                cache_dir,
                env_files,
            } => {
                if env_files.is_none() {
                    add(&cache_dir.join(OS_CONFIG_FILES_JSON));
                }
                for f in self.files().unwrap_or_default() {
                    add(&f);
                }
            }
        }
        dirs
    }

    /// Read and merge the metadata now.
    pub fn read(&self) -> Result<Snapshot, MetadataError> {
        let mut newest: Option<SystemTime> = None;
        let mut bump = |t: Option<SystemTime>| {
            if let Some(t) = t {
                newest = Some(newest.map_or(t, |n| n.max(t)));
            }
        };
        let mut paths: Vec<PathBuf> = Vec::new();
        if let MetadataSource::Occ { .. } = self {
            if let Some(list) = self.list_file() {
                bump(mtime(&list));
            }
            paths.extend(FALLBACK_METADATA.iter().map(PathBuf::from));
        }
        paths.extend(self.files()?);
        let mut docs = Vec::new();
        let mut files = Vec::new();
        for p in paths {
            // A file that does not exist (yet) is skipped, as os-apply-config
            // does; a configured plain file that is absent means no metadata.
            let Some(bytes) = read_opt(&p)? else {
                continue;
            };
            let v: Value = serde_json::from_slice(&bytes).map_err(|e| MetadataError::Invalid {
                path: p.clone(),
                msg: e.to_string(),
            })?;
            if let MetadataSource::File(_) = self {
                if !v.is_object() {
                    return Err(MetadataError::NotAnObject { path: p });
                }
            }
            bump(mtime(&p));
            docs.push(v);
            files.push(p);
        }
        Ok(Snapshot {
            doc: merge_all(&docs),
            files,
            changed_at: newest,
        })
    }
}

impl Snapshot {
    /// The image the metadata asks for under `id_key` (and `source_key`),
    /// or `None` when it names none.
    pub fn wanted(&self, id_key: &str, source_key: &str) -> Result<Option<Wanted>, MetadataError> {
        let Some(idv) = lookup(&self.doc, id_key) else {
            return Ok(None);
        };
        let id = scalar(idv).ok_or_else(|| MetadataError::BadValue {
            key: id_key.to_owned(),
            value: render_raw(idv),
            what: "image id",
            why: "it must be a string".into(),
        })?;
        crate::format::manifest::validate_image_id(&id).map_err(|why| MetadataError::BadValue {
            key: id_key.to_owned(),
            value: render_raw(idv),
            what: "image id",
            why,
        })?;
        let source = match lookup(&self.doc, source_key) {
            None => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(Value::String(s)) => Some(s.trim().to_owned()),
            Some(other) => {
                return Err(MetadataError::BadValue {
                    key: source_key.to_owned(),
                    value: render_raw(other),
                    what: "image source",
                    why: "it must be a string (a store URL or directory)".into(),
                })
            }
        };
        Ok(Some(Wanted { id, source }))
    }
}

/// A string, or a number printed as os-apply-config prints it (an id like
/// `42` in YAML-born metadata).
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_owned()),
        Value::Number(_) => Some(render_raw(v)),
        _ => None,
    }
}

fn read_opt(p: &Path) -> Result<Option<Vec<u8>>, MetadataError> {
    match std::fs::read(p) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(MetadataError::Read {
            path: p.to_path_buf(),
            source: e,
        }),
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

#[cfg(test)]
mod tests;
