//! Planning: what must change in the root to make it match a manifest.
//!
//! Pure: the caller walks the root (and hashes the few files whose size
//! matches but whose mtime does not) and hands the results in. The plan is a
//! merge-join of two lists in manifest order, so it costs O(entries).

use crate::sys::fastmap::{HashMap, HashSet};

use serde::Serialize;

use crate::format::manifest::{Digest, Entry, FileType, Manifest, RelPath};
use crate::fs::node::Node;
use crate::fs::preserve::Preserve;

mod planner;
mod removal;
use planner::Planner;

/// How a staged object takes the place of what is at its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Replace {
    /// Nothing is there.
    New,
    /// A non-directory is there and the new object is a non-directory: one
    /// atomic `rename`.
    Rename,
    /// A directory is replaced by a non-directory or the reverse:
    /// `RENAME_EXCHANGE`, then the old object is removed from staging.
    Exchange,
}

/// One change in the swap phase, in manifest order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create a directory where nothing is.
    MkDir {
        /// Index of the target entry.
        t: usize,
    },
    /// Stage an object (file content, symlink, node, empty directory) and
    /// move it into place.
    Place {
        /// Index of the target entry.
        t: usize,
        /// How it replaces what is there.
        how: Replace,
    },
    /// Give the file at the hardlink's target another name.
    Link {
        /// Index of the target (hardlink) entry.
        t: usize,
        /// How it replaces what is there.
        how: Replace,
    },
    /// Fix owner, mode, xattrs and mtime in place (content is equal).
    Meta {
        /// Index of the target entry.
        t: usize,
        /// Index of the root node.
        r: usize,
    },
}

/// A path to remove, deepest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Delete {
    /// The path.
    pub path: RelPath,
    /// What is there.
    pub ftype: FileType,
    /// Its size.
    pub size: u64,
    /// The whole removed tree ([`Plan::delete_trees`], by index) it goes
    /// with, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tree: Option<u32>,
}

/// A removed directory that goes whole with everything below it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeleteTree {
    /// Its top.
    pub path: RelPath,
    /// Removals it covers, itself included.
    pub entries: u64,
}

/// Counts and bytes, for operators and for preflight.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlanStats {
    /// Paths that do not exist in the root yet.
    pub added: u64,
    /// Content bytes of added files.
    pub added_bytes: u64,
    /// Paths whose content or type changes.
    pub changed: u64,
    /// New content bytes of changed files.
    pub changed_bytes: u64,
    /// Paths removed.
    pub deleted: u64,
    /// Content bytes removed.
    pub deleted_bytes: u64,
    /// Paths whose metadata only changes (directories included).
    pub metadata_only: u64,
    /// Distinct contents that must come from the source.
    pub fetch_objects: u64,
    /// Their uncompressed bytes.
    pub fetch_bytes: u64,
    /// Contents copied from elsewhere in the root instead of fetched.
    pub local_copies: u64,
    /// Bytes written to staging (free space needed, before block rounding).
    pub stage_bytes: u64,
    /// Objects staged (inodes needed).
    pub stage_objects: u64,
}

/// The result of planning.
#[derive(Debug, Default)]
pub struct Plan {
    /// Swap-phase actions in manifest order (parents before children).
    pub actions: Vec<Action>,
    /// Removals, deepest first.
    pub deletes: Vec<Delete>,
    /// Removed directories that go whole, in tree order: the top of each
    /// subtree of removals with nothing preserved or mounted below it. The
    /// swap moves each out of the root in one rename, so the quiesce window
    /// pays a rename per tree instead of an unlink per file (a rollback
    /// takes away whole trees the update brought); their contents are
    /// removed after the services are back. Every path below one is still
    /// listed in [`Plan::deletes`] (the keep area and the counts use them).
    pub delete_trees: Vec<DeleteTree>,
    /// Target directories whose metadata must be made exact at the end.
    pub dirmeta: Vec<usize>,
    /// Content already in the root, by digest: path holding it.
    pub local: HashMap<Digest, RelPath>,
    /// Digests that must be fetched from the source.
    pub fetch: Vec<(Digest, u64)>,
    /// Counts.
    pub stats: PlanStats,
    /// Things skipped, for the operator.
    pub warnings: Vec<String>,
    /// Reasons to refuse the update (preflight).
    pub conflicts: Vec<String>,
    /// For each root node (same order as [`RootView::nodes`]): the content
    /// digest the plan took it to hold, for regular files it could tell.
    pub root_digests: Vec<Option<Digest>>,
}

impl Plan {
    /// True when nothing at all changes.
    pub fn is_noop(&self) -> bool {
        self.actions.is_empty() && self.deletes.is_empty() && self.dirmeta.is_empty()
    }
}

/// The root as walked, plus digests computed for ambiguous files.
pub struct RootView<'a> {
    /// Walked nodes in manifest order (preserved paths already left out).
    pub nodes: &'a [Node],
    /// Digests of root files that were hashed (size matched, mtime did not).
    pub digests: &'a HashMap<RelPath, Digest>,
}

/// True when a root file may have the target's content without hashing:
/// same size and same ns mtime (rsync's quick check, at ns precision).
pub fn quick_match(t: &Entry, n: &Node) -> bool {
    n.stat.ftype == FileType::File && n.stat.size == t.size && n.stat.mtime_ns == t.mtime_ns
}

/// True when the node's record of its current image vouches for the root
/// file's content: same type, size and ns mtime as recorded.
fn record_match(c: &Entry, n: &Node) -> bool {
    c.ftype == FileType::File
        && n.stat.ftype == FileType::File
        && c.size == n.stat.size
        && c.mtime_ns == n.stat.mtime_ns
}

/// What the root file's content is known to be, without reading it: what
/// the stamp cache vouches for (the inode is unchanged since a run knew it),
/// then the current image's record (it knows when two images share size and
/// mtime but not content), then a hash taken before planning, then the
/// target's quick check.
fn root_digest(
    t: Option<&Entry>,
    n: &Node,
    current: Option<&Entry>,
    digests: &HashMap<RelPath, Digest>,
) -> Option<Digest> {
    if n.known.is_some() && n.stat.ftype == FileType::File {
        return n.known;
    }
    if let Some(c) = current.filter(|c| record_match(c, n)) {
        return c.sha256;
    }
    if let Some(d) = digests.get(&n.path) {
        return Some(*d);
    }
    if let Some(t) = t.filter(|t| t.ftype == FileType::File && quick_match(t, n)) {
        return t.sha256;
    }
    None
}

/// Root files that need hashing before planning: same type and size as the
/// target file, but neither the stamp cache, the current record nor the
/// quick check tells their content. With `distrust_quick` (a root with no
/// record at all, its first apply, or a record left unparsed) every such
/// same-size file is hashed: size and mtime alone cannot prove it holds the
/// image's bytes.
pub fn needs_hash(
    target: &Manifest,
    nodes: &[Node],
    current: Option<&Manifest>,
    distrust_quick: bool,
) -> Vec<RelPath> {
    let current_of: HashMap<&RelPath, &Entry> = current
        .map(|c| c.entries.iter().map(|e| (&e.path, e)).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    join(&target.entries, nodes, |t, n| {
        if let (Some(t), Some(n)) = (t, n) {
            if t.ftype == FileType::File
                && n.stat.ftype == FileType::File
                && n.stat.size == t.size
                && n.known.is_none()
                && (distrust_quick || !quick_match(t, n))
                && !current_of.get(&n.path).is_some_and(|c| record_match(c, n))
            {
                out.push(n.path.clone());
            }
        }
    });
    out
}

/// Merge-join target entries and root nodes by path, in manifest order.
fn join<'a>(
    entries: &'a [Entry],
    nodes: &'a [Node],
    mut f: impl FnMut(Option<&'a Entry>, Option<&'a Node>),
) {
    let (mut i, mut j) = (0, 0);
    while i < entries.len() || j < nodes.len() {
        let ord = match (entries.get(i), nodes.get(j)) {
            (Some(e), Some(n)) => e.path.tree_cmp(&n.path),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, _) => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                f(Some(&entries[i]), None);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                f(None, Some(&nodes[j]));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                f(Some(&entries[i]), Some(&nodes[j]));
                i += 1;
                j += 1;
            }
        }
    }
}

fn meta_equal(t: &Entry, n: &Node) -> bool {
    (t.ftype == FileType::Symlink || t.mode == n.stat.mode)
        && t.uid == n.stat.uid
        && t.gid == n.stat.gid
        && t.mtime_ns == n.stat.mtime_ns
        && t.xattrs == n.xattrs
}

/// Compute the plan that turns the root into `target`.
pub fn plan(
    target: &Manifest,
    root: &RootView<'_>,
    current: Option<&Manifest>,
    preserve: &Preserve,
) -> Plan {
    Planner::new(target, root, current, preserve).run()
}

/// The target index an action is about.
pub fn action_t(a: &Action) -> usize {
    match a {
        Action::MkDir { t }
        | Action::Place { t, .. }
        | Action::Link { t, .. }
        | Action::Meta { t, .. } => *t,
    }
}

fn pairs<'a>(
    entries: &'a [Entry],
    nodes: &'a [Node],
) -> Vec<(Option<&'a Entry>, Option<&'a Node>)> {
    let mut v = Vec::with_capacity(entries.len().max(nodes.len()));
    join(entries, nodes, |t, n| v.push((t, n)));
    v
}

/// True when the root inode's names equal the target's hardlink group.
fn same_group(
    n: &Node,
    path: &RelPath,
    inode_names: &HashMap<(u64, u64), Vec<&RelPath>>,
    link_group: &HashMap<&RelPath, Vec<&RelPath>>,
) -> bool {
    let root_names: HashSet<&RelPath> = if n.stat.nlink > 1 {
        inode_names
            .get(&(n.stat.dev, n.stat.ino))
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default()
    } else {
        std::iter::once(&n.path).collect()
    };
    let mut want: HashSet<&RelPath> = link_group
        .get(path)
        .map(|v| v.iter().copied().collect())
        .unwrap_or_default();
    want.insert(path);
    // Names of the inode outside the walk (preserved paths) are unknown; only
    // compare when the counts agree with what we saw.
    root_names == want && n.stat.nlink as usize == root_names.len()
}

/// Count a staged object; a content not seen yet joins `needed`, settled
/// (local copy or fetch) once the whole tree is visited.
fn count_content(
    p: &mut Plan,
    t: &Entry,
    fetch_seen: &mut HashSet<Digest>,
    needed: &mut Vec<(Digest, u64)>,
    changed: bool,
) {
    p.stats.stage_objects += 1;
    if t.ftype != FileType::File {
        return;
    }
    if changed {
        p.stats.changed_bytes += t.size;
    } else {
        p.stats.added_bytes += t.size;
    }
    p.stats.stage_bytes += t.size;
    if t.size == 0 {
        return;
    }
    let Some(d) = t.sha256 else { return };
    if fetch_seen.insert(d) {
        needed.push((d, t.size));
    }
}
