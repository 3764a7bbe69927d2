//! The swap: moving staged objects into place, each by one atomic rename,
//! then removals (deepest first), then directory metadata (last, because
//! every rename and removal changes its directory's mtime).
//!
//! Running processes keep the old inode of a replaced file; nothing is ever
//! written in place except metadata of objects whose content is unchanged.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::engine::plan::{Action, Plan, Replace};
use crate::engine::stage::{meta_of, StagedNames, Staging};
use crate::format::manifest::Xattrs;
use crate::format::manifest::{Entry, FileType, Manifest, RelPath};
use crate::fs::fsx;
use crate::fs::node::Node;
use crate::sys::fault;

mod trees;
pub use trees::{assemble, NewTrees};

/// What the swap did.
#[derive(Default, Debug, Serialize, Clone)]
pub struct SwapReport {
    /// Renames into place (including exchanges and links).
    pub renames: u64,
    /// Directories created (inside the quiesce window).
    pub mkdirs: u64,
    /// New directory trees built in staging before the window and moved
    /// into place whole.
    pub new_trees: u64,
    /// Files and directories that arrived inside those trees.
    pub in_new_trees: u64,
    /// In-place metadata fixes.
    pub metadata: u64,
    /// Paths removed.
    pub deleted: u64,
    /// Whole removed trees moved out of the root in one rename each.
    pub deleted_trees: u64,
    /// Removed files moved into staging (their blocks are freed later).
    pub set_aside: u64,
    /// The staging directory (holding those trees and files) is removed
    /// after the post-apply hooks instead of inside the quiesce window.
    pub cleanup_deferred: bool,
    /// Directories whose metadata was finalised.
    pub dirs_finalised: u64,
    /// Removals skipped (directory still holds preserved or foreign content).
    pub kept: Vec<String>,
}

/// Caches the descriptor of the directory last worked in; actions come in
/// manifest order, so consecutive ones mostly share a parent.
pub struct DirCache<'r> {
    root: BorrowedFd<'r>,
    path: Option<RelPath>,
    fd: Option<OwnedFd>,
}

impl<'r> DirCache<'r> {
    /// A cache over `root`.
    pub fn new(root: BorrowedFd<'r>) -> Self {
        DirCache {
            root,
            path: None,
            fd: None,
        }
    }

    /// Descriptor of the directory `rel` (opened beneath the root).
    pub fn get(&mut self, rel: &RelPath) -> io::Result<BorrowedFd<'_>> {
        if self.path.as_ref() != Some(rel) || self.fd.is_none() {
            let fd = fsx::open_dir_beneath(self.root, rel)?;
            self.fd = Some(fd);
            self.path = Some(rel.clone());
        }
        match &self.fd {
            Some(fd) => Ok(fd.as_fd()),
            None => Err(io::Error::other("directory cache empty")),
        }
    }

    /// Forget the cached descriptor (after the directory itself moved).
    pub fn invalidate(&mut self) {
        self.path = None;
        self.fd = None;
    }
}

fn parent_and_name(p: &RelPath) -> (RelPath, Vec<u8>) {
    if p.is_root() {
        (RelPath::root(), b".".to_vec())
    } else {
        (
            p.parent().unwrap_or_else(RelPath::root),
            p.file_name().to_vec(),
        )
    }
}

/// What staging prepared for the swap.
#[derive(Clone, Copy)]
pub struct Staged<'a> {
    /// The staging directory.
    pub staging: &'a Staging,
    /// The staged name of each placed target entry.
    pub names: &'a StagedNames,
    /// New directory trees built in staging.
    pub trees: &'a NewTrees,
}

/// Move every staged object into place and fix metadata in place.
pub fn swap(
    plan: &Plan,
    target: &Manifest,
    nodes: &[Node],
    root: BorrowedFd<'_>,
    staged: &Staged<'_>,
    report: &mut SwapReport,
) -> Result<()> {
    let Staged {
        staging,
        names: staged,
        trees,
    } = *staged;
    let entries = &target.entries;
    let sfd = staging.fd.as_fd();
    let mut dirs = DirCache::new(root);
    let empty = Xattrs::new();
    for a in &plan.actions {
        let t = crate::engine::plan::action_t(a);
        if trees.inside.contains(&t) {
            continue;
        }
        let e = &entries[t];
        let (parent, name) = parent_and_name(&e.path);
        let step = || format!("{}", e.path);
        match a {
            Action::MkDir { .. } if trees.tops.contains_key(&t) => {
                let pfd = dirs
                    .get(&parent)
                    .with_context(|| format!("opening {parent}"))?;
                put(sfd, &trees.tops[&t], pfd, &name, Replace::New)
                    .with_context(|| format!("moving the new tree {} into place", step()))?;
                report.renames += 1;
                report.new_trees += 1;
            }
            Action::MkDir { .. } => {
                let pfd = dirs
                    .get(&parent)
                    .with_context(|| format!("opening {parent}"))?;
                // The apply itself may have created it since planning (the
                // parents of its state directory on an empty root).
                let have = match fsx::mkdir_at(pfd, &name, 0o700) {
                    Ok(()) => empty.clone(),
                    Err(err)
                        if err.kind() == std::io::ErrorKind::AlreadyExists
                            && fsx::stat_at(pfd, &name)
                                .is_ok_and(|st| st.ftype == FileType::Dir) =>
                    {
                        fsx::read_xattrs(pfd, &name)?
                    }
                    Err(err) => {
                        return Err(err).with_context(|| format!("creating directory {}", step()))
                    }
                };
                fsx::set_meta_at(pfd, &name, &meta_of(e), &have)
                    .with_context(|| format!("setting metadata of {}", step()))?;
                report.mkdirs += 1;
            }
            Action::Place { how, .. } => {
                let sname = staged
                    .get(&t)
                    .ok_or_else(|| anyhow!("{}: nothing staged", e.path))?;
                let pfd = dirs
                    .get(&parent)
                    .with_context(|| format!("opening {parent}"))?;
                put(sfd, sname, pfd, &name, *how)
                    .with_context(|| format!("moving new {} into place", step()))?;
                report.renames += 1;
            }
            Action::Link { how, .. } => {
                let tgt = RelPath(e.target.as_ref().map(|x| x.0.clone()).unwrap_or_default());
                let (tparent, tname) = parent_and_name(&tgt);
                let tmp = format!("l{t:x}").into_bytes();
                {
                    let tfd = dirs
                        .get(&tparent)
                        .with_context(|| format!("opening {tparent}"))?;
                    fsx::link_at(tfd, &tname, sfd, &tmp)
                        .with_context(|| format!("linking {tgt} for {}", step()))?;
                }
                let pfd = dirs
                    .get(&parent)
                    .with_context(|| format!("opening {parent}"))?;
                put(sfd, &tmp, pfd, &name, *how)
                    .with_context(|| format!("moving hardlink {} into place", step()))?;
                report.renames += 1;
            }
            Action::Meta { r, .. } => {
                let pfd = dirs
                    .get(&parent)
                    .with_context(|| format!("opening {parent}"))?;
                fsx::set_meta_at(pfd, &name, &meta_of(e), &nodes[*r].xattrs)
                    .with_context(|| format!("setting metadata of {}", step()))?;
                fsx::set_mtime_at(pfd, &name, e.mtime_ns)
                    .with_context(|| format!("setting mtime of {}", step()))?;
                report.metadata += 1;
            }
        }
        if matches!(
            a,
            Action::Place {
                how: Replace::Exchange,
                ..
            } | Action::Link {
                how: Replace::Exchange,
                ..
            }
        ) {
            dirs.invalidate();
        }
        fault::point("mid-swap");
    }
    Ok(())
}

fn put(
    sfd: BorrowedFd<'_>,
    sname: &[u8],
    pfd: BorrowedFd<'_>,
    name: &[u8],
    how: Replace,
) -> io::Result<()> {
    match how {
        Replace::New | Replace::Rename => fsx::rename_at(sfd, sname, pfd, name),
        Replace::Exchange => match fsx::exchange_at(sfd, sname, pfd, name) {
            Ok(()) => Ok(()),
            // The old object vanished since planning: a plain rename is right.
            Err(e) if e.kind() == io::ErrorKind::NotFound => fsx::rename_at(sfd, sname, pfd, name),
            Err(e) => Err(e),
        },
    }
}

/// Remove deleted paths. Whole removed trees ([`Plan::delete_trees`]) are
/// first moved into `graveyard` (the staging directory, on the same
/// filesystem) by one rename each, to be removed with it after the window;
/// then the remaining paths go one by one, deepest first, files by a
/// rename into the graveyard as well, directories by `rmdir`. A directory that
/// still holds something imageupd does not manage (preserved paths, another
/// mount) is kept and reported, like `rsync --delete` does.
pub fn delete(
    plan: &Plan,
    root: BorrowedFd<'_>,
    graveyard: BorrowedFd<'_>,
    report: &mut SwapReport,
) -> Result<()> {
    let moved = move_trees(plan, root, graveyard, report)?;
    let mut dirs = DirCache::new(root);
    for d in &plan.deletes {
        if d.tree.is_some_and(|t| moved[t as usize]) {
            continue;
        }
        let (parent, name) = parent_and_name(&d.path);
        let pfd = match dirs.get(&parent) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("opening {parent}")),
        };
        let res = if d.ftype == FileType::Dir {
            fsx::rmdir_at(pfd, &name)
        } else {
            set_aside(pfd, &name, graveyard, report)
        };
        match res {
            Ok(()) => report.deleted += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e)
                if d.ftype == FileType::Dir
                    && (e.raw_os_error() == Some(libc::ENOTEMPTY)
                        || e.raw_os_error() == Some(libc::EBUSY)) =>
            {
                tracing::warn!(path = %d.path, "kept directory: it still holds preserved or foreign content");
                report.kept.push(d.path.to_string());
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", d.path)),
        }
        fault::point("mid-delete");
    }
    Ok(())
}

/// Move a removed non-directory into the graveyard: a rename costs the
/// same whatever the file's size, where the unlink of a file's last name
/// frees its blocks inside the window. Unlinked when it cannot move.
fn set_aside(
    pfd: BorrowedFd<'_>,
    name: &[u8],
    graveyard: BorrowedFd<'_>,
    report: &mut SwapReport,
) -> io::Result<()> {
    let grave = format!("gone-f{:x}", report.set_aside).into_bytes();
    match fsx::rename_at(pfd, name, graveyard, &grave) {
        Ok(()) => {
            report.set_aside += 1;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        Err(_) => fsx::unlink_at(pfd, name),
    }
}

/// Move each whole removed tree into the graveyard; for each tree of
/// [`Plan::delete_trees`], whether it is gone. A tree that cannot be
/// renamed (an immutable or busy directory) is left to the path-by-path
/// removal, which reports what it cannot remove.
fn move_trees(
    plan: &Plan,
    root: BorrowedFd<'_>,
    graveyard: BorrowedFd<'_>,
    report: &mut SwapReport,
) -> Result<Vec<bool>> {
    let mut moved = vec![false; plan.delete_trees.len()];
    let mut dirs = DirCache::new(root);
    for (i, top) in plan.delete_trees.iter().enumerate() {
        let (parent, name) = parent_and_name(&top.path);
        let pfd = match dirs.get(&parent) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                moved[i] = true;
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("opening {parent}")),
        };
        let grave = format!("gone-t{i:x}").into_bytes();
        match fsx::rename_at(pfd, &name, graveyard, &grave) {
            Ok(()) => {
                report.deleted += top.entries;
                report.deleted_trees += 1;
                moved[i] = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => moved[i] = true,
            Err(e) => {
                tracing::warn!(path = %top.path, "could not move the removed tree aside ({e}); removing it path by path");
            }
        }
        fault::point("mid-delete");
    }
    Ok(moved)
}

/// Make directory metadata exact (deepest first), re-reading what is there.
pub fn finalise_dirs(
    indices: &[usize],
    entries: &[Entry],
    root: BorrowedFd<'_>,
    report: &mut SwapReport,
) -> Result<()> {
    let mut dirs = DirCache::new(root);
    for &i in indices {
        let e = &entries[i];
        let (parent, name) = parent_and_name(&e.path);
        let pfd = match dirs.get(&parent) {
            Ok(fd) => fd,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err).with_context(|| format!("opening {parent}")),
        };
        let st = fsx::stat_at(pfd, &name).with_context(|| format!("stat of {}", e.path))?;
        if st.ftype != FileType::Dir {
            return Err(anyhow!(
                "{} is a {} where the image has a directory",
                e.path,
                st.ftype.label()
            ));
        }
        if st.mode != e.mode || st.uid != e.uid || st.gid != e.gid {
            let have = fsx::read_xattrs(pfd, &name)?;
            fsx::set_meta_at(pfd, &name, &meta_of(e), &have)
                .with_context(|| format!("setting metadata of {}", e.path))?;
        } else {
            let have = fsx::read_xattrs(pfd, &name)?;
            fsx::sync_xattrs(pfd, &name, &have, &e.xattrs)
                .with_context(|| format!("setting xattrs of {}", e.path))?;
        }
        if st.mtime_ns != e.mtime_ns {
            fsx::set_mtime_at(pfd, &name, e.mtime_ns)
                .with_context(|| format!("setting mtime of {}", e.path))?;
        }
        report.dirs_finalised += 1;
    }
    Ok(())
}
