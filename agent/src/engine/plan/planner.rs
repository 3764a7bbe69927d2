//! The planning walk: target entries and root nodes merge-joined by path,
//! each pair turned into actions, removals and counts.

use super::removal::whole_trees;
use super::{
    action_t, count_content, meta_equal, pairs, root_digest, same_group, Action, Delete, Plan,
    Replace, RootView,
};
use crate::format::manifest::{Digest, Entry, FileType, Manifest, RelPath};
use crate::fs::node::Node;
use crate::fs::preserve::Preserve;
use crate::sys::fastmap::{HashMap, HashSet};

/// True when `path` lies strictly below one of `list`.
fn under(list: &[RelPath], path: &RelPath) -> bool {
    list.iter().any(|d| path.starts_with(d) && path != d)
}

/// One planning run: the indexes it looks things up in and the plan it
/// builds.
pub(super) struct Planner<'a> {
    entries: &'a [Entry],
    nodes: &'a [Node],
    digests: &'a HashMap<RelPath, Digest>,
    preserve: &'a Preserve,
    index_of: HashMap<&'a RelPath, usize>,
    node_of: HashMap<&'a RelPath, usize>,
    current_of: HashMap<&'a RelPath, &'a Entry>,
    /// Inode groups in the root, to know when in-place metadata changes
    /// would leak into another name.
    inode_names: HashMap<(u64, u64), Vec<&'a RelPath>>,
    /// The target's hardlink groups, by their target file.
    link_group: HashMap<&'a RelPath, Vec<&'a RelPath>>,
    p: Plan,
    /// Root dirs replaced wholesale.
    gone_below: Vec<RelPath>,
    /// Mount points.
    skip_below: Vec<RelPath>,
    replaced_files: HashSet<&'a RelPath>,
    touched_dirs: HashSet<RelPath>,
    dirmeta: HashSet<usize>,
    fetch_seen: HashSet<Digest>,
    /// Contents to stage, in the order first met, until settled.
    needed: Vec<(Digest, u64)>,
}

impl<'a> Planner<'a> {
    pub(super) fn new(
        target: &'a Manifest,
        root: &RootView<'a>,
        current: Option<&'a Manifest>,
        preserve: &'a Preserve,
    ) -> Self {
        let entries = &target.entries[..];
        let nodes = root.nodes;
        let index_of: HashMap<&RelPath, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (&e.path, i))
            .collect();
        let node_of: HashMap<&RelPath, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (&n.path, i))
            .collect();
        let current_of: HashMap<&RelPath, &Entry> = current
            .map(|c| c.entries.iter().map(|e| (&e.path, e)).collect())
            .unwrap_or_default();
        let mut inode_names: HashMap<(u64, u64), Vec<&RelPath>> = HashMap::default();
        for n in nodes
            .iter()
            .filter(|n| n.stat.ftype == FileType::File && n.stat.nlink > 1)
        {
            inode_names
                .entry((n.stat.dev, n.stat.ino))
                .or_default()
                .push(&n.path);
        }
        let mut link_group: HashMap<&RelPath, Vec<&RelPath>> = HashMap::default();
        for e in entries.iter().filter(|e| e.ftype == FileType::Hardlink) {
            if let Some(t) = &e.target {
                if let Some(&ti) = index_of.get(&RelPath(t.0.clone())) {
                    link_group
                        .entry(&entries[ti].path)
                        .or_default()
                        .push(&e.path);
                }
            }
        }
        Planner {
            entries,
            nodes,
            digests: root.digests,
            preserve,
            index_of,
            node_of,
            current_of,
            inode_names,
            link_group,
            p: Plan::default(),
            gone_below: Vec::new(),
            skip_below: Vec::new(),
            replaced_files: HashSet::default(),
            touched_dirs: HashSet::default(),
            dirmeta: HashSet::default(),
            fetch_seen: HashSet::default(),
            needed: Vec::new(),
        }
    }

    /// The whole plan.
    pub(super) fn run(mut self) -> Plan {
        self.known_content();
        for (t, n) in pairs(self.entries, self.nodes) {
            self.visit(t, n);
        }
        self.follow_restaged_links();
        self.settle_content();
        self.finish()
    }

    /// Content the root already holds, by digest: files that match the target
    /// (quick check or hash) and files that still match the current image's
    /// record (so a moved or renamed file is copied locally, not fetched).
    fn known_content(&mut self) {
        self.p.root_digests.reserve(self.nodes.len());
        for (t, n) in pairs(self.entries, self.nodes) {
            let Some(n) = n else { continue };
            if n.stat.ftype != FileType::File {
                self.p.root_digests.push(None);
                continue;
            }
            let d = root_digest(t, n, self.current_of.get(&n.path).copied(), self.digests);
            self.p.root_digests.push(d);
        }
    }

    /// Each content the update stages: copied from a root file that holds
    /// it, else fetched. Only the contents the update needs are indexed (a
    /// map of every file's digest was a tenth of a plan's memory).
    fn settle_content(&mut self) {
        let needed = std::mem::take(&mut self.needed);
        let want: HashSet<Digest> = needed.iter().map(|(d, _)| *d).collect();
        for (n, d) in self.nodes.iter().zip(&self.p.root_digests) {
            if let Some(d) = d.filter(|d| n.stat.size > 0 && want.contains(d)) {
                self.p.local.entry(d).or_insert_with(|| n.path.clone());
            }
        }
        for (d, size) in needed {
            if self.p.local.contains_key(&d) {
                self.p.stats.local_copies += 1;
            } else {
                self.p.fetch.push((d, size));
                self.p.stats.fetch_objects += 1;
                self.p.stats.fetch_bytes += size;
            }
        }
    }

    /// One path: in the target, in the root, or both.
    fn visit(&mut self, t: Option<&'a Entry>, n: Option<&'a Node>) {
        let path = t
            .map(|t| &t.path)
            .or(n.map(|n| &n.path))
            .cloned()
            .unwrap_or_else(RelPath::root);
        if under(&self.skip_below, &path) {
            if t.is_some() {
                self.p.warnings.push(format!(
                    "{path}: lies on another mounted filesystem; left alone"
                ));
            }
            return;
        }
        if under(&self.gone_below, &path) {
            // Went away with its replaced parent directory.
            if let Some(t) = t {
                // A target entry below a directory that was replaced by a
                // non-directory cannot exist (the manifest forbids it).
                self.p.conflicts.push(format!(
                    "{}: internal: entry below a replaced directory",
                    t.path
                ));
            }
            return;
        }
        if t.is_some() && self.preserve.matches(&path) {
            return;
        }
        let ti = t.map(|t| self.index_of[&t.path]);
        match (t, n) {
            (None, None) => {}
            (None, Some(n)) => self.delete(n),
            (Some(t), None) => self.add(t, ti.unwrap_or_default()),
            (Some(t), Some(n)) => self.update(t, n, ti.unwrap_or_default()),
        }
    }

    /// A root path the image does not have.
    fn delete(&mut self, n: &'a Node) {
        if n.mountpoint {
            self.p.warnings.push(format!(
                "{}: a filesystem is mounted here and the image has no such directory; left alone",
                n.path
            ));
            self.skip_below.push(n.path.clone());
            return;
        }
        self.p.deletes.push(Delete {
            path: n.path.clone(),
            ftype: n.stat.ftype,
            size: if n.stat.ftype == FileType::File {
                n.stat.size
            } else {
                0
            },
            tree: None,
        });
        self.p.stats.deleted += 1;
        if n.stat.ftype == FileType::File {
            self.p.stats.deleted_bytes += n.stat.size;
        }
        if let Some(parent) = n.path.parent() {
            self.touched_dirs.insert(parent);
        }
    }

    /// An image path the root does not have.
    fn add(&mut self, t: &'a Entry, ti: usize) {
        self.p.stats.added += 1;
        if let Some(parent) = t.path.parent() {
            self.touched_dirs.insert(parent);
        }
        match t.ftype {
            FileType::Dir => {
                self.p.actions.push(Action::MkDir { t: ti });
                self.dirmeta.insert(ti);
            }
            FileType::Hardlink => self.p.actions.push(Action::Link {
                t: ti,
                how: Replace::New,
            }),
            _ => {
                self.p.actions.push(Action::Place {
                    t: ti,
                    how: Replace::New,
                });
                count_content(
                    &mut self.p,
                    t,
                    &mut self.fetch_seen,
                    &mut self.needed,
                    false,
                );
            }
        }
    }

    /// A path both have.
    fn update(&mut self, t: &'a Entry, n: &'a Node, ti: usize) {
        if n.mountpoint {
            if t.ftype != FileType::Dir {
                self.p.warnings.push(format!(
                    "{}: a filesystem is mounted here but the image has a {}; left alone",
                    t.path,
                    t.ftype.label()
                ));
            }
            self.skip_below.push(n.path.clone());
            return;
        }
        let want_dir = t.ftype == FileType::Dir;
        let is_dir = n.stat.ftype == FileType::Dir;
        if want_dir != is_dir {
            self.change_type(t, n, ti);
            return;
        }
        match t.ftype {
            FileType::Dir => {
                if !meta_equal(t, n) {
                    self.dirmeta.insert(ti);
                    self.p.stats.metadata_only += 1;
                }
            }
            FileType::File => self.update_file(t, n, ti),
            FileType::Hardlink => self.update_hardlink(t, n, ti),
            FileType::Symlink
            | FileType::Char
            | FileType::Block
            | FileType::Fifo
            | FileType::Socket => self.update_node(t, n, ti),
        }
    }

    /// Type change across the directory boundary.
    fn change_type(&mut self, t: &'a Entry, n: &'a Node, ti: usize) {
        let rt = n.stat.ftype;
        let want_dir = t.ftype == FileType::Dir;
        let is_dir = rt == FileType::Dir;
        if rt == FileType::Symlink {
            let legit = self.current_of.get(&t.path).is_some_and(|c| {
                c.ftype == FileType::Symlink && c.target.as_ref().map(|x| &x.0) == n.target.as_ref()
            });
            if !legit {
                self.p.conflicts.push(format!(
                    "{}: the image has a directory here but the root has a symlink to {:?} that the current image did not install; refusing to write there (remove or fix it, then re-run)",
                    t.path,
                    String::from_utf8_lossy(n.target.as_deref().unwrap_or_default())
                ));
                return;
            }
        }
        if is_dir && !self.replace_dir(t, n) {
            return;
        }
        self.p.stats.changed += 1;
        if let Some(parent) = t.path.parent() {
            self.touched_dirs.insert(parent);
        }
        if t.ftype == FileType::Hardlink {
            self.p.actions.push(Action::Link {
                t: ti,
                how: Replace::Exchange,
            });
        } else {
            self.p.actions.push(Action::Place {
                t: ti,
                how: Replace::Exchange,
            });
            count_content(&mut self.p, t, &mut self.fetch_seen, &mut self.needed, true);
        }
        if want_dir {
            self.dirmeta.insert(ti);
        }
    }

    /// A root directory the image replaces by a non-directory: refused
    /// (false) when it holds preserved paths or mounts, else it goes with
    /// everything below it.
    fn replace_dir(&mut self, t: &'a Entry, n: &'a Node) -> bool {
        if self.preserve.has_preserved_below(&n.path) {
            self.p.conflicts.push(format!(
                "{}: the image replaces this directory by a {}, but it holds preserved paths",
                t.path,
                t.ftype.label()
            ));
            return false;
        }
        if self
            .nodes
            .iter()
            .any(|m| m.mountpoint && m.path.starts_with(&n.path))
        {
            self.p.conflicts.push(format!(
                "{}: the image replaces this directory by a {}, but a filesystem is mounted below it",
                t.path,
                t.ftype.label()
            ));
            return false;
        }
        self.gone_below.push(n.path.clone());
        // Count what goes away with it.
        for m in self
            .nodes
            .iter()
            .filter(|m| m.path.starts_with(&n.path) && m.path != n.path)
        {
            self.p.stats.deleted += 1;
            if m.stat.ftype == FileType::File {
                self.p.stats.deleted_bytes += m.stat.size;
            }
        }
        true
    }

    /// A regular file in both: re-staged when its content differs (or when
    /// changing it in place would change other names too), else its
    /// metadata is fixed in place.
    fn update_file(&mut self, t: &'a Entry, n: &'a Node, ti: usize) {
        let rt = n.stat.ftype;
        let same_content = rt == FileType::File
            && n.stat.size == t.size
            && root_digest(
                Some(t),
                n,
                self.current_of.get(&n.path).copied(),
                self.digests,
            ) == t.sha256;
        if !same_content {
            self.restage_file(t, ti);
        } else if !meta_equal(t, n) || !same_group(n, &t.path, &self.inode_names, &self.link_group)
        {
            if n.stat.nlink > 1 && !same_group(n, &t.path, &self.inode_names, &self.link_group) {
                // Changing it in place would change other names too: re-stage.
                self.restage_file(t, ti);
            } else {
                self.p.actions.push(Action::Meta {
                    t: ti,
                    r: self.node_of[&n.path],
                });
                self.p.stats.metadata_only += 1;
            }
        }
    }

    /// Stage the target file anew and rename it over the root's.
    fn restage_file(&mut self, t: &'a Entry, ti: usize) {
        self.replaced_files.insert(&t.path);
        self.p.actions.push(Action::Place {
            t: ti,
            how: Replace::Rename,
        });
        self.p.stats.changed += 1;
        count_content(&mut self.p, t, &mut self.fetch_seen, &mut self.needed, true);
        if let Some(parent) = t.path.parent() {
            self.touched_dirs.insert(parent);
        }
    }

    /// A hardlink in the target: linked again unless the root name already
    /// is the target file's inode (and that file stays).
    fn update_hardlink(&mut self, t: &'a Entry, n: &'a Node, ti: usize) {
        let tgt = t
            .target
            .as_ref()
            .map(|x| RelPath(x.0.clone()))
            .unwrap_or_else(RelPath::root);
        let linked = n.stat.ftype == FileType::File
            && !self.replaced_files.contains(&tgt)
            && self.node_of.get(&tgt).is_some_and(|&ri| {
                let a = &self.nodes[ri].stat;
                a.dev == n.stat.dev && a.ino == n.stat.ino
            });
        if !linked {
            self.p.actions.push(Action::Link {
                t: ti,
                how: Replace::Rename,
            });
            self.p.stats.changed += 1;
            if let Some(parent) = t.path.parent() {
                self.touched_dirs.insert(parent);
            }
        }
    }

    /// Nodes without content: replaced when their identity (type, link
    /// target, device number) differs.
    fn update_node(&mut self, t: &'a Entry, n: &'a Node, ti: usize) {
        let rt = n.stat.ftype;
        let differs = rt != t.ftype
            || (rt == FileType::Symlink
                && n.target.as_deref() != t.target.as_ref().map(|v| v.0.as_slice()))
            || (matches!(rt, FileType::Char | FileType::Block) && Some(n.stat.rdev) != t.rdev);
        if differs {
            self.p.actions.push(Action::Place {
                t: ti,
                how: Replace::Rename,
            });
            self.p.stats.changed += 1;
            self.p.stats.stage_objects += 1;
            if let Some(parent) = t.path.parent() {
                self.touched_dirs.insert(parent);
            }
        } else if !meta_equal(t, n) {
            self.p.actions.push(Action::Meta {
                t: ti,
                r: self.node_of[&n.path],
            });
            self.p.stats.metadata_only += 1;
        }
    }

    /// Hardlinks whose target file is re-staged must follow it to the new inode.
    fn follow_restaged_links(&mut self) {
        let entries = self.entries;
        let linked_already: HashSet<usize> = self
            .p
            .actions
            .iter()
            .filter_map(|a| {
                if let Action::Link { t, .. } = a {
                    Some(*t)
                } else {
                    None
                }
            })
            .collect();
        let mut extra_links = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.ftype == FileType::Hardlink
                && !linked_already.contains(&i)
                && !self.preserve.matches(&e.path)
            {
                let tgt = e
                    .target
                    .as_ref()
                    .map(|x| RelPath(x.0.clone()))
                    .unwrap_or_else(RelPath::root);
                if self.replaced_files.contains(&tgt) && !under(&self.skip_below, &e.path) {
                    extra_links.push(Action::Link {
                        t: i,
                        how: Replace::Rename,
                    });
                    self.p.stats.changed += 1;
                    if let Some(parent) = e.path.parent() {
                        self.touched_dirs.insert(parent);
                    }
                }
            }
        }
        if !extra_links.is_empty() {
            self.p.actions.extend(extra_links);
            self.p.actions.sort_by(|a, b| {
                entries[action_t(a)]
                    .path
                    .tree_cmp(&entries[action_t(b)].path)
            });
        }
    }

    /// Directories whose entries change get their mtime (and the rest)
    /// redone last, deepest first; removals deepest first.
    fn finish(mut self) -> Plan {
        let entries = self.entries;
        for d in std::mem::take(&mut self.touched_dirs) {
            if let Some(&i) = self.index_of.get(&d) {
                if entries[i].ftype == FileType::Dir
                    && !self.preserve.matches(&d)
                    && !under(&self.skip_below, &d)
                {
                    self.dirmeta.insert(i);
                }
            }
        }
        let mut dm: Vec<usize> = self.dirmeta.into_iter().collect();
        dm.sort_by(|a, b| entries[*b].path.tree_cmp(&entries[*a].path));
        let mut p = self.p;
        p.dirmeta = dm;
        p.delete_trees = whole_trees(&mut p.deletes, self.preserve, &self.skip_below);
        p.deletes.reverse();
        p
    }
}
