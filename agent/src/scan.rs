//! Walking a tree: the root being updated, a source directory being
//! published, or a mounted image used directly as the source.
//!
//! The walk uses descriptor-relative calls only (see [`crate::fsx`]), visits
//! names in byte order so the result is in manifest order
//! ([`RelPath::tree_cmp`]), never descends into another filesystem, and skips
//! preserved paths entirely.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};

use crate::fsx::{self, Stat};
use crate::manifest::{FileType, RelPath, Xattrs};
use crate::preserve::Preserve;

/// One object found by the walk.
#[derive(Clone, Debug)]
pub struct Node {
    /// Path relative to the walked root.
    pub path: RelPath,
    /// `lstat` of the object.
    pub stat: Stat,
    /// Its xattrs.
    pub xattrs: Xattrs,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// True for a directory on which another filesystem is mounted; its
    /// content is invisible to the walk and its metadata is not ours.
    pub mountpoint: bool,
}

/// What the walk should leave out.
#[derive(Default)]
pub struct ScanOptions<'a> {
    /// Preserved paths are not reported and not descended into.
    pub preserve: Option<&'a Preserve>,
    /// Extra paths to skip (imageupd's own staging area).
    pub skip: Vec<RelPath>,
}

/// Walk the tree below `root`.
pub fn scan(root: BorrowedFd<'_>, opts: &ScanOptions<'_>) -> Result<Vec<Node>> {
    let st = fsx::stat_fd(root).context("stat of the tree's top directory")?;
    let xattrs = fsx::read_xattrs(root, b".").context("reading xattrs of the top directory")?;
    let dev = st.dev;
    let mut out = Vec::with_capacity(16 * 1024);
    out.push(Node { path: RelPath::root(), stat: st, xattrs, target: None, mountpoint: false });
    walk(root, &RelPath::root(), dev, opts, &mut out)?;
    Ok(out)
}

fn walk(dir: BorrowedFd<'_>, dir_path: &RelPath, dev: u64, opts: &ScanOptions<'_>, out: &mut Vec<Node>) -> Result<()> {
    let names = fsx::read_dir_names(dir).with_context(|| format!("listing {dir_path}"))?;
    for name in names {
        let path = dir_path.join(&name);
        if opts.preserve.is_some_and(|p| p.matches(&path)) || opts.skip.contains(&path) {
            continue;
        }
        let stat = match fsx::stat_at(dir, &name) {
            Ok(s) => s,
            // Vanished while we looked (a running node changes /var): skip it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("stat of {path}")),
        };
        let mountpoint = stat.ftype == FileType::Dir && stat.dev != dev;
        let xattrs = if mountpoint {
            Xattrs::new()
        } else {
            fsx::read_xattrs(dir, &name).with_context(|| format!("reading xattrs of {path}"))?
        };
        let target = if stat.ftype == FileType::Symlink {
            Some(fsx::readlink_at(dir, &name).with_context(|| format!("reading symlink {path}"))?)
        } else {
            None
        };
        let descend = stat.ftype == FileType::Dir && !mountpoint;
        out.push(Node { path: path.clone(), stat, xattrs, target, mountpoint });
        if descend {
            let sub = match fsx::open_dir_beneath(dir, &RelPath(name.clone())) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| format!("opening directory {path}")),
            };
            walk(sub.as_fd(), &path, dev, opts, out)?;
        }
    }
    Ok(())
}

/// Run `f` over `items` on `threads` threads; the first error wins.
pub fn par_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let threads = threads.clamp(1, 64).min(items.len().max(1));
    let mut results: Vec<Option<R>> = Vec::with_capacity(items.len());
    results.resize_with(items.len(), || None);
    let slots = std::sync::Mutex::new(&mut results);
    let first_err: std::sync::Mutex<Option<anyhow::Error>> = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    return;
                }
                match f(&items[i]) {
                    Ok(r) => {
                        if let Ok(mut g) = slots.lock() {
                            g[i] = Some(r);
                        }
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        if let Ok(mut g) = first_err.lock() {
                            g.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = first_err.into_inner().unwrap_or(None) {
        return Err(e);
    }
    Ok(results.into_iter().flatten().collect())
}

/// Turn walked nodes into manifest entries, hashing regular files on
/// `threads` threads. The first name of a multiply-linked inode (in manifest
/// order) is the file; later names become hardlinks to it.
pub fn to_entries(root: BorrowedFd<'_>, nodes: &[Node], threads: usize) -> Result<Vec<crate::manifest::Entry>> {
    use crate::manifest::{Entry, RawBytes};
    use std::collections::HashMap;
    let mut first_name: HashMap<(u64, u64), RelPath> = HashMap::new();
    let mut entries: Vec<Entry> = Vec::with_capacity(nodes.len());
    let mut to_hash: Vec<usize> = Vec::new();
    for n in nodes {
        if n.mountpoint {
            // Another filesystem's top: record it as a plain directory.
        }
        let mut e = Entry {
            path: n.path.clone(),
            ftype: n.stat.ftype,
            mode: n.stat.mode,
            uid: n.stat.uid,
            gid: n.stat.gid,
            mtime_ns: n.stat.mtime_ns,
            size: 0,
            sha256: None,
            target: n.target.clone().map(RawBytes),
            rdev: None,
            xattrs: n.xattrs.clone(),
        };
        match n.stat.ftype {
            FileType::File => {
                let key = (n.stat.dev, n.stat.ino);
                if n.stat.nlink > 1 {
                    if let Some(first) = first_name.get(&key) {
                        e.ftype = FileType::Hardlink;
                        e.target = Some(RawBytes(first.0.clone()));
                        e.mode = 0;
                        e.uid = 0;
                        e.gid = 0;
                        e.mtime_ns = 0;
                        e.xattrs.clear();
                        entries.push(e);
                        continue;
                    }
                    first_name.insert(key, n.path.clone());
                }
                e.size = n.stat.size;
                to_hash.push(entries.len());
            }
            FileType::Char | FileType::Block => e.rdev = Some(n.stat.rdev),
            FileType::Symlink => e.mode = 0o777,
            _ => {}
        }
        entries.push(e);
    }
    let digests = par_map(&to_hash, threads, |&i| {
        let p = &entries[i].path;
        let f = fsx::open_file_beneath(root, p).with_context(|| format!("opening {p}"))?;
        let (d, len) = crate::stream::digest_of(std::io::BufReader::with_capacity(256 * 1024, f))
            .with_context(|| format!("reading {p}"))?;
        Ok((d, len))
    })?;
    for (&i, (d, len)) in to_hash.iter().zip(digests) {
        entries[i].sha256 = Some(d);
        entries[i].size = len;
    }
    Ok(entries)
}
