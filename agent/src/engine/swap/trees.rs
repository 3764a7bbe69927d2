//! New directory trees are built whole in staging, before the quiesce
//! window, and moved into place with one rename each.
//!
//! A directory the root does not have yet cannot be seen by a running
//! service until it appears, so nothing obliges its content to wait for the
//! quiesce window: the staged files of a new tree are renamed into a copy
//! of the tree inside the staging directory while services run, and the
//! swap then moves the tree's top with a single rename. A package update
//! adds many new directories (documentation, plugins, locales); each of
//! their files would otherwise cost one rename inside the window.
//!
//! Crash safety is that of any staged object: until the top is renamed the
//! tree is staging content (removed on the next start), afterwards it is
//! wholly in place. A tree holding a hardlink, or a file another name links
//! to, is left to the ordinary path-by-path swap (links are made in place).

use std::collections::HashMap;
use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{anyhow, Context, Result};

use super::{parent_and_name, DirCache};
use crate::engine::plan::{Action, Plan, Replace};
use crate::engine::stage::{meta_of, StagedNames, Staging};
use crate::format::manifest::{Entry, FileType, Manifest, RelPath, Xattrs};
use crate::fs::fsx;

/// Trees assembled in staging.
#[derive(Default, Debug)]
pub struct NewTrees {
    /// Target index of each tree's top directory → its name in staging.
    pub tops: HashMap<usize, Vec<u8>>,
    /// Target indices of everything below a top (already in its tree).
    pub inside: HashSet<usize>,
    /// Files moved into trees.
    pub files: u64,
    /// Directories created in trees (tops included).
    pub dirs: u64,
}

/// The new trees of `plan`: for every directory created where the root has
/// nothing (and whose parent is not new itself), the contiguous run of
/// actions below it, if they are all plain creations and no hardlink is
/// involved.
fn eligible(plan: &Plan, entries: &[Entry]) -> Vec<(usize, Vec<usize>)> {
    let linked: Vec<RelPath> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::Link { t, .. } => entries[*t].target.as_ref().map(|x| RelPath(x.0.clone())),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    let acts = &plan.actions;
    let mut i = 0;
    while i < acts.len() {
        let Action::MkDir { t: top } = acts[i] else {
            i += 1;
            continue;
        };
        let tp = &entries[top].path;
        let mut j = i + 1;
        let mut below = Vec::new();
        let mut ok = !tp.is_root();
        while j < acts.len() {
            let t = crate::engine::plan::action_t(&acts[j]);
            if !entries[t].path.starts_with(tp) {
                break;
            }
            match acts[j] {
                Action::MkDir { .. }
                | Action::Place {
                    how: Replace::New, ..
                } => below.push(t),
                _ => ok = false,
            }
            j += 1;
        }
        if ok && !below.is_empty() && !linked.iter().any(|l| l.starts_with(tp)) {
            out.push((top, below));
        }
        i = j;
    }
    out
}

/// Build the new trees inside `staging`, moving their staged files in. A
/// tree whose top exists in `root` by now (the apply's own state directory
/// on an empty root, say), or whose parent is not a directory of the root
/// yet, is left to the path-by-path swap.
pub fn assemble(
    plan: &Plan,
    target: &Manifest,
    root: BorrowedFd<'_>,
    staging: &Staging,
    staged: &StagedNames,
) -> Result<NewTrees> {
    let entries = &target.entries;
    let sfd = staging.fd.as_fd();
    let mut trees = NewTrees::default();
    let empty = Xattrs::new();
    let mut in_root = DirCache::new(root);
    for (top, below) in eligible(plan, entries) {
        let tname = format!("tree-{top:x}").into_bytes();
        let te = &entries[top];
        let (tparent, ttop) = parent_and_name(&te.path);
        // Only into a directory the root has now, and only where nothing is:
        // a parent that the swap itself creates or replaces (a type change)
        // is not there yet, and a top the apply created since planning is.
        let free = match in_root.get(&tparent) {
            Ok(pfd) => match fsx::stat_at(pfd, &ttop) {
                Ok(_) => false,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(e).with_context(|| format!("stat of {}", te.path)),
            },
            Err(e) => {
                tracing::debug!("{}: built path by path ({tparent}: {e})", te.path);
                false
            }
        };
        if !free {
            continue;
        }
        make_dir(sfd, &tname, te, &empty)?;
        trees.dirs += 1;
        let mut dirs = DirCache::new(sfd);
        let mut made: Vec<(RelPath, usize)> = vec![(RelPath(tname.clone()), top)];
        for t in below {
            let e = &entries[t];
            let (parent, name) = parent_and_name(&e.path);
            let sparent = in_tree(&tname, &te.path, &parent);
            let pfd = dirs
                .get(&sparent)
                .with_context(|| format!("opening {sparent} in staging"))?;
            if e.ftype == FileType::Dir {
                make_dir(pfd, &name, e, &empty)?;
                made.push((in_tree(&tname, &te.path, &e.path), t));
                trees.dirs += 1;
            } else {
                let sname = staged
                    .get(&t)
                    .ok_or_else(|| anyhow!("{}: nothing staged", e.path))?;
                fsx::rename_at(sfd, sname, pfd, &name)
                    .with_context(|| format!("moving {} into its new tree", e.path))?;
                trees.files += 1;
            }
            trees.inside.insert(t);
        }
        // Directory mtimes last, deepest first: every entry is in by now.
        drop(dirs);
        let mut dirs = DirCache::new(sfd);
        for (rel, t) in made.iter().rev() {
            let (parent, name) = parent_and_name(rel);
            let pfd = dirs
                .get(&parent)
                .with_context(|| format!("opening {parent} in staging"))?;
            fsx::set_mtime_at(pfd, &name, entries[*t].mtime_ns)
                .with_context(|| format!("setting mtime of {}", entries[*t].path))?;
        }
        trees.tops.insert(top, tname);
    }
    Ok(trees)
}

fn make_dir(dir: BorrowedFd<'_>, name: &[u8], e: &Entry, have: &Xattrs) -> Result<()> {
    fsx::mkdir_at(dir, name, 0o700).with_context(|| format!("creating {} in staging", e.path))?;
    fsx::set_meta_at(dir, name, &meta_of(e), have)
        .with_context(|| format!("setting metadata of {} in staging", e.path))
}

/// Where `path` (below the tree's top `top`) sits in staging.
fn in_tree(tname: &[u8], top: &RelPath, path: &RelPath) -> RelPath {
    let mut p = tname.to_vec();
    p.extend_from_slice(&path.0[top.0.len()..]);
    RelPath(p)
}
