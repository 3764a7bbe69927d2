//! The keep area (`var/lib/imageupd/keep/<sha256-hex>`): before the swap,
//! every regular file the swap will replace or delete is hard-linked there
//! by its known content digest, so its inode outlives the swap's renames
//! on the root's own filesystem. Until the health gate passes, a rollback
//! in place ([`crate::net::keep_source`]) reads the old contents from
//! there instead of the network. Hard links copy no data.
//!
//! Crash safety: the area is a cache. A half-filled area is fine (missing
//! objects are fetched), a wrong one too (every object is verified by its
//! digest when used); it is emptied before each new fill.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{Context, Result};

use crate::engine::plan::{Action, Plan, Replace};
use crate::engine::record::CurrentRecord;
use crate::format::manifest::{Digest, FileType, Manifest, RelPath};
use crate::fs::fsx;
use crate::fs::node::Node;
use crate::net::keep_source::{drop_keep, KEEP_DIR};

/// What a fill kept.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KeepReport {
    /// Distinct contents linked into the keep area.
    pub objects: u64,
    /// Their bytes (no data was copied).
    pub bytes: u64,
    /// Replaced files whose content the plan could not name (not kept:
    /// a rollback fetches them).
    pub unknown: u64,
    /// Links that failed (logged; not kept either).
    pub failed: u64,
}

/// Paths (files and whole replaced directories) the plan's swap replaces
/// or deletes.
struct Replaced<'a> {
    paths: HashSet<&'a RelPath>,
    dirs: Vec<&'a RelPath>,
}

impl<'a> Replaced<'a> {
    /// `path_of`: the path of target entry `t`.
    fn of(plan: &'a Plan, path_of: impl Fn(usize) -> &'a RelPath) -> Replaced<'a> {
        let mut r = Replaced {
            paths: HashSet::new(),
            dirs: Vec::new(),
        };
        for a in &plan.actions {
            if let Action::Place { t, how } | Action::Link { t, how } = a {
                match how {
                    Replace::New => {}
                    Replace::Rename => {
                        r.paths.insert(path_of(*t));
                    }
                    // A directory replaced by a file goes whole.
                    Replace::Exchange => {
                        r.paths.insert(path_of(*t));
                        r.dirs.push(path_of(*t));
                    }
                }
            }
        }
        for d in &plan.deletes {
            r.paths.insert(&d.path);
        }
        r
    }

    fn contains(&self, p: &RelPath) -> bool {
        self.paths.contains(p)
            || self
                .dirs
                .iter()
                .any(|d| p.0.len() > d.0.len() && p.0.starts_with(&d.0) && p.0[d.0.len()] == b'/')
    }
}

/// Empty the keep area below `state` and fill it for `plan`: each regular
/// file of `nodes` (the walk, in the order of `plan.root_digests`) that
/// the swap replaces or deletes is linked as `keep/<hex>` of its content
/// digest — the plan's, else the record of the current image's for that
/// path (only
/// a cache key: it is verified when used). Only within the root's
/// filesystem `dev`; a state directory elsewhere keeps nothing.
pub fn fill(
    root: BorrowedFd<'_>,
    dev: u64,
    state: BorrowedFd<'_>,
    plan: &Plan,
    nodes: &[Node],
    target: &Manifest,
    current: &CurrentRecord,
) -> Result<KeepReport> {
    drop_keep(state)?;
    let mut rep = KeepReport::default();
    if fsx::stat_fd(state)?.dev != dev {
        tracing::info!(
            "the state directory is on another filesystem: nothing is kept for a rollback in place"
        );
        return Ok(rep);
    }
    let replaced = Replaced::of(plan, |t| &target.entries[t].path);
    if replaced.paths.is_empty() {
        return Ok(rep);
    }
    // The record is parsed and indexed only if the plan left some content
    // unnamed.
    let mut by_path: Option<std::collections::HashMap<RelPath, Option<Digest>>> = None;
    let mut recorded = |p: &RelPath| -> Option<Digest> {
        let m = by_path.get_or_insert_with(|| {
            current
                .parse()
                .map(|c| c.entries.into_iter().map(|e| (e.path, e.sha256)).collect())
                .unwrap_or_default()
        });
        m.get(p).copied().flatten()
    };
    fsx::mkdir_at(state, KEEP_DIR, 0o700).context("creating the keep area")?;
    let keep = fsx::open_dir_beneath(state, &RelPath(KEEP_DIR.to_vec()))
        .context("opening the keep area")?;
    let mut parent: Option<(RelPath, OwnedFd)> = None;
    let mut seen: HashSet<Digest> = HashSet::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.stat.ftype != FileType::File || n.stat.size == 0 || !replaced.contains(&n.path) {
            continue;
        }
        let Some(d) = plan
            .root_digests
            .get(i)
            .copied()
            .flatten()
            .or_else(|| recorded(&n.path))
        else {
            rep.unknown += 1;
            continue;
        };
        if !seen.insert(d) {
            continue;
        }
        match link_one(root, keep.as_fd(), &mut parent, &n.path, &d) {
            Ok(()) => {
                rep.objects += 1;
                rep.bytes += n.stat.size;
            }
            Err(e) => {
                rep.failed += 1;
                tracing::warn!("not kept for a rollback in place: {}: {e:#}", n.path);
            }
        }
    }
    Ok(rep)
}

/// Link the root file `path` as `keep/<hex of d>`, reusing the open
/// parent directory of the previous file when it is the same.
fn link_one(
    root: BorrowedFd<'_>,
    keep: BorrowedFd<'_>,
    parent: &mut Option<(RelPath, OwnedFd)>,
    path: &RelPath,
    d: &Digest,
) -> Result<()> {
    let dir = path.parent().unwrap_or_else(RelPath::root);
    if parent.as_ref().is_none_or(|(p, _)| *p != dir) {
        // Never through a symlink: the parent is opened beneath the root.
        let fd = fsx::open_dir_beneath(root, &dir).context("opening its directory")?;
        *parent = Some((dir, fd));
    }
    let Some((_, pfd)) = parent.as_ref() else {
        anyhow::bail!("internal: its directory is not open");
    };
    match fsx::link_at(pfd.as_fd(), path.file_name(), keep, d.to_hex().as_bytes()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).context("hard-linking it into the keep area"),
    }
}

/// Remove the keep area of the root's state directory, if any: the gate
/// passed (or the rollback finished) and nothing needs it any more.
pub fn drop_area(state: BorrowedFd<'_>) {
    match drop_keep(state) {
        Ok(0) => {}
        Ok(n) => tracing::debug!("dropped the keep area ({n} objects)"),
        Err(e) => tracing::warn!("{e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::Delete;

    #[test]
    fn replaced_covers_files_deletes_and_exchanged_dirs() {
        let paths: Vec<RelPath> = ["a", "b", "c", "d"]
            .iter()
            .map(|p| RelPath(p.as_bytes().to_vec()))
            .collect();
        let plan = Plan {
            actions: vec![
                Action::Place {
                    t: 0,
                    how: Replace::New,
                },
                Action::Place {
                    t: 1,
                    how: Replace::Rename,
                },
                Action::Link {
                    t: 2,
                    how: Replace::Exchange,
                },
            ],
            deletes: vec![Delete {
                path: RelPath(b"gone/x".to_vec()),
                ftype: FileType::File,
                size: 3,
                tree: None,
            }],
            ..Default::default()
        };
        let r = Replaced::of(&plan, |t| &paths[t]);
        let has = |p: &str| r.contains(&RelPath(p.as_bytes().to_vec()));
        assert!(!has("a"), "a new path replaces nothing");
        assert!(has("b"));
        assert!(
            has("c") && has("c/inner/file"),
            "an exchanged dir goes whole"
        );
        assert!(!has("cc"), "a sibling with the same prefix is not below c");
        assert!(has("gone/x"));
        assert!(!has("d"));
    }
}
