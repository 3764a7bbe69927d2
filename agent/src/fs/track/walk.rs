//! The walk of the root when the tracker vouches for the interval: the
//! previous walk's objects, with the changed directories listed again.
//!
//! A directory the tracker did not report keeps its previous entries. A
//! changed one is listed and its entries stat'ed as in a full walk; a
//! subdirectory found there is taken from the previous walk only when it is
//! the very same directory inode (renaming a tree into place leaves no
//! events inside it), and is walked whole otherwise.

use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;

use anyhow::{Context, Result};

use crate::format::manifest::{FileType, RelPath};
use crate::fs::fsx;
use crate::fs::node::Node;
use crate::fs::scan::{list_one, top_node, ScanOptions};
use crate::sys::fastmap::HashMap;
use crate::sys::par::par_map;

/// What the tracked walk did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrackedStats {
    /// Objects taken from the previous walk without a syscall.
    pub reused: u64,
    /// Directories listed again.
    pub relisted: u64,
}

/// Walk `root` from `base` (the previous walk, in manifest order) and the
/// changed directories `dirty`.
pub fn walk(
    root: BorrowedFd<'_>,
    opts: &ScanOptions<'_>,
    base: super::Baseline,
    dirty: &BTreeSet<RelPath>,
) -> Result<(Vec<Node>, TrackedStats)> {
    let st = fsx::stat_fd(root).context("stat of the tree's top directory")?;
    let xattrs = fsx::read_xattrs(root, b".").context("reading xattrs of the top directory")?;
    // The changed directories are listed up front, in parallel as a full
    // walk lists (a large update touches thousands); the walk below then
    // only assembles.
    // (Preserved trees, e.g. logs, change all the time and are never walked.)
    let todo: Vec<&RelPath> = dirty
        .iter()
        .filter(|d| !opts.preserve.is_some_and(|p| p.matches(d)) && !opts.skip.contains(d))
        .collect();
    let lists = par_map(&todo, crate::fs::scan::scan_threads(), |d| {
        Ok(list_one(root, d, st.dev, opts)?.0)
    })?;
    let listed: HashMap<RelPath, Vec<Node>> = todo.into_iter().cloned().zip(lists).collect();
    let mut w = Walker {
        root,
        opts,
        dev: st.dev,
        dirty,
        listed,
        children: children_by_dir(base.nodes),
        settled_before: base
            .walk_start_ns
            .saturating_sub(crate::fs::stamps::RACY_NS),
        out: Vec::new(),
        stats: TrackedStats::default(),
    };
    w.out.push(top_node(st, xattrs));
    w.dir(&RelPath::root())?;
    Ok((w.out, w.stats))
}

/// The previous walk's objects grouped by parent directory, each group in
/// name order (as the walk emitted them).
fn children_by_dir(base: Vec<Node>) -> HashMap<RelPath, Vec<Node>> {
    let mut m: HashMap<RelPath, Vec<Node>> = HashMap::default();
    for n in base {
        if let Some(p) = n.path.parent() {
            m.entry(p).or_default().push(n);
        }
    }
    m
}

struct Walker<'a> {
    root: BorrowedFd<'a>,
    opts: &'a ScanOptions<'a>,
    dev: u64,
    dirty: &'a BTreeSet<RelPath>,
    /// The changed directories' entries, as listed now.
    listed: HashMap<RelPath, Vec<Node>>,
    children: HashMap<RelPath, Vec<Node>>,
    /// An inode whose ctime is before this (ns) and unchanged since the
    /// previous walk read it is the very object it read.
    settled_before: i64,
    out: Vec<Node>,
    stats: TrackedStats,
}

impl Walker<'_> {
    /// Emit the entries of `dir` (and recursively theirs) in manifest order.
    fn dir(&mut self, dir: &RelPath) -> Result<()> {
        let old = self.children.remove(dir).unwrap_or_default();
        if !self.dirty.contains(dir) {
            for c in old {
                let sub = c.is_walked_dir().then(|| c.path.clone());
                self.out.push(c);
                self.stats.reused += 1;
                if let Some(p) = sub {
                    self.dir(&p)?;
                }
            }
            return Ok(());
        }
        self.stats.relisted += 1;
        let fresh = match self.listed.remove(dir) {
            Some(l) => l,
            None => list_one(self.root, dir, self.dev, self.opts)?.0,
        };
        for mut c in fresh {
            let sub = c.is_walked_dir().then(|| c.path.clone());
            let prev = old
                .binary_search_by(|o| o.path.0.cmp(&c.path.0))
                .ok()
                .map(|i| &old[i]);
            // The stamp cache's rule, against the previous walk itself: the
            // same inode, unchanged since and not racy, holds what it held.
            if let Some(p) = prev.filter(|p| {
                c.known.is_none()
                    && p.stat.ftype == FileType::File
                    && c.stat.ftype == FileType::File
                    && (p.stat.ino, p.stat.ctime_ns) == (c.stat.ino, c.stat.ctime_ns)
                    && p.stat.ctime_ns < self.settled_before
            }) {
                c.known = p.known;
            }
            let same = sub.is_some()
                && prev.is_some_and(|p| {
                    p.is_walked_dir()
                        && p.stat.ino == c.stat.ino
                        && (p.stat.ctime_ns == c.stat.ctime_ns || self.dirty.contains(&c.path))
                });
            self.out.push(c);
            match (sub, same) {
                (Some(p), true) => self.dir(&p)?,
                (Some(p), false) => self.whole(&p)?,
                (None, _) => {}
            }
        }
        Ok(())
    }

    /// Walk everything below `dir`, as a full walk would.
    fn whole(&mut self, dir: &RelPath) -> Result<()> {
        self.stats.relisted += 1;
        let (fresh, _) = list_one(self.root, dir, self.dev, self.opts)?;
        for c in fresh {
            let sub = c.is_walked_dir().then(|| c.path.clone());
            self.out.push(c);
            if let Some(p) = sub {
                self.whole(&p)?;
            }
        }
        Ok(())
    }
}
