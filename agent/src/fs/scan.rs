//! Walking a tree: the root being updated, a source directory being
//! published, or a mounted image used directly as the source.
//!
//! The walk uses descriptor-relative calls only (see [`crate::fs::fsx`]), visits
//! names in byte order so the result is in manifest order
//! ([`RelPath::tree_cmp`]), never descends into another filesystem, and skips
//! preserved paths entirely.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{Context, Result};

use crate::format::manifest::{FileType, RelPath, Xattrs};
use crate::fs::fsx;
use crate::fs::node::Node;
use crate::fs::preserve::Preserve;
use crate::sys::par::par_map;

/// What the walk should leave out.
#[derive(Default)]
pub struct ScanOptions<'a> {
    /// Preserved paths are not reported and not descended into.
    pub preserve: Option<&'a Preserve>,
    /// Extra paths to skip (imageupd's own staging area).
    pub skip: Vec<RelPath>,
    /// What an earlier walk read from inodes unchanged since: their xattrs
    /// and symlink targets are taken from here instead of re-read.
    pub stamps: Option<&'a crate::fs::stamps::Stamps>,
}

/// Walk the tree below `root`, on [`scan_threads`] threads.
pub fn scan(root: BorrowedFd<'_>, opts: &ScanOptions<'_>) -> Result<Vec<Node>> {
    scan_with(root, opts, scan_threads())
}

/// Threads for walking: directory reads are syscall-bound and scale with CPUs.
pub fn scan_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .min(8)
}

/// Walk with an explicit thread count. Each directory is one job; a worker
/// lists it, stats its entries and queues its subdirectories, first in
/// tree order on top, so the workers go depth first in the order the result
/// is assembled. The calling thread assembles it as the listings arrive, in
/// manifest order whatever the timing, and so holds only the listings the
/// workers are ahead by, not every directory's before assembling (at a
/// million entries that was the peak of an apply).
pub fn scan_with(
    root: BorrowedFd<'_>,
    opts: &ScanOptions<'_>,
    threads: usize,
) -> Result<Vec<Node>> {
    use std::collections::HashMap;
    use std::sync::{Condvar, Mutex};
    let st = fsx::stat_fd(root).context("stat of the tree's top directory")?;
    let xattrs = fsx::read_xattrs(root, b".").context("reading xattrs of the top directory")?;
    let dev = st.dev;
    let shared = Mutex::new(Shared {
        queue: vec![RelPath::root()],
        pending: 1,
        failed: None,
        listed: HashMap::new(),
    });
    let cv = Condvar::new();
    let worker = || loop {
        let job = {
            let Ok(mut g) = shared.lock() else { return };
            loop {
                if g.failed.is_some() {
                    return;
                }
                if let Some(j) = g.queue.pop() {
                    break j;
                }
                if g.pending == 0 {
                    return;
                }
                g = match cv.wait(g) {
                    Ok(g) => g,
                    Err(_) => return,
                };
            }
        };
        let res = list_one(root, &job, dev, opts);
        let Ok(mut g) = shared.lock() else { return };
        match res {
            Ok((children, subdirs)) => {
                g.pending += subdirs.len();
                g.queue.extend(subdirs.into_iter().rev());
                g.listed.insert(job, children);
            }
            Err(e) => {
                g.failed.get_or_insert(e);
            }
        }
        g.pending -= 1;
        cv.notify_all();
    };
    let mut out = Vec::with_capacity(opts.stamps.map_or(1024, |s| s.len() + 1024));
    out.push(top_node(st, xattrs));
    let assembled = std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(worker);
        }
        let res = emit(&RelPath::root(), &shared, &cv, &mut out);
        if res.is_err() {
            // Stop the workers: the walk is over.
            if let Ok(mut g) = shared.lock() {
                g.failed
                    .get_or_insert_with(|| anyhow::anyhow!("the walk stopped"));
            }
            cv.notify_all();
        }
        res
    });
    let shared = shared
        .into_inner()
        .map_err(|_| anyhow::anyhow!("scan worker panicked"))?;
    if let Some(e) = shared.failed {
        return Err(e);
    }
    assembled?;
    Ok(out)
}

/// What the workers and the assembling thread share.
struct Shared {
    /// Directories to list, the next one on top.
    queue: Vec<RelPath>,
    /// Directories queued or being listed.
    pending: usize,
    /// The first error of any worker.
    failed: Option<anyhow::Error>,
    /// Listings not assembled yet.
    listed: std::collections::HashMap<RelPath, Vec<Node>>,
}

/// Append the entries of `dir` (and recursively theirs) in manifest order,
/// waiting for each listing.
fn emit(
    dir: &RelPath,
    shared: &std::sync::Mutex<Shared>,
    cv: &std::sync::Condvar,
    out: &mut Vec<Node>,
) -> Result<()> {
    let children = {
        let mut g = shared
            .lock()
            .map_err(|_| anyhow::anyhow!("scan worker panicked"))?;
        loop {
            if let Some(c) = g.listed.remove(dir) {
                break c;
            }
            if g.failed.is_some() {
                return Err(anyhow::anyhow!("the walk failed"));
            }
            if g.pending == 0 {
                // Never queued: nothing to assemble below it.
                break Vec::new();
            }
            g = cv
                .wait(g)
                .map_err(|_| anyhow::anyhow!("scan worker panicked"))?;
        }
    };
    for c in children {
        let p = c.is_walked_dir().then(|| c.path.clone());
        out.push(c);
        if let Some(p) = p {
            emit(&p, shared, cv, out)?;
        }
    }
    Ok(())
}

/// The walk's first object: the tree's top directory, as `stat` and its
/// xattrs read it.
pub(crate) fn top_node(stat: fsx::Stat, xattrs: Xattrs) -> Node {
    Node {
        path: RelPath::root(),
        stat,
        xattrs,
        target: None,
        mountpoint: false,
        cached: false,
        known: None,
    }
}

/// List one directory: its entries (sorted by name) and the subdirectories
/// to walk next.
pub(crate) fn list_one(
    root: BorrowedFd<'_>,
    dir_path: &RelPath,
    dev: u64,
    opts: &ScanOptions<'_>,
) -> Result<(Vec<Node>, Vec<RelPath>)> {
    let dir = match fsx::open_dir_beneath(root, dir_path) {
        Ok(fd) => fd,
        // Vanished (or replaced by a non-directory) while we looked.
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir_path.is_root() => {
            return Ok((Vec::new(), Vec::new()))
        }
        Err(e) => return Err(e).with_context(|| format!("opening directory {dir_path}")),
    };
    let dir = dir.as_fd();
    let names = fsx::read_dir_names(dir).with_context(|| format!("listing {dir_path}"))?;
    let mut out = Vec::with_capacity(names.len());
    let mut subdirs = Vec::new();
    // Most directories have nothing preserved below them: match names only
    // where something could be.
    let preserve = opts
        .preserve
        .filter(|p| dir_path.is_root() || p.has_preserved_below(dir_path));
    for name in names {
        let path = dir_path.join(&name);
        if preserve.is_some_and(|p| p.matches(&path)) || opts.skip.contains(&path) {
            continue;
        }
        let stat = match fsx::stat_at(dir, &name) {
            Ok(s) => s,
            // Vanished while we looked (a running node changes /var): skip it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("stat of {path}")),
        };
        let mountpoint = stat.ftype == FileType::Dir && stat.dev != dev;
        if let Some(hit) = opts.stamps.and_then(|s| s.lookup(&path, &stat)) {
            if stat.ftype == FileType::Dir {
                subdirs.push(path.clone());
            }
            out.push(Node {
                path,
                stat,
                xattrs: hit.xattrs(),
                target: hit.target(),
                mountpoint,
                cached: true,
                known: hit.digest,
            });
            continue;
        }
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
        if stat.ftype == FileType::Dir && !mountpoint {
            subdirs.push(path.clone());
        }
        out.push(Node {
            path,
            stat,
            xattrs,
            target,
            mountpoint,
            cached: false,
            known: None,
        });
    }
    Ok((out, subdirs))
}

/// Turn walked nodes into manifest entries, hashing regular files on
/// `threads` threads. The first name of a multiply-linked inode (in manifest
/// order) is the file; later names become hardlinks to it.
pub fn to_entries(
    root: BorrowedFd<'_>,
    nodes: &[Node],
    threads: usize,
) -> Result<Vec<crate::format::manifest::Entry>> {
    use crate::format::manifest::{Entry, RawBytes};
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
        let (d, len) =
            crate::format::stream::digest_of(std::io::BufReader::with_capacity(256 * 1024, f))
                .with_context(|| format!("reading {p}"))?;
        Ok((d, len))
    })?;
    for (&i, (d, len)) in to_hash.iter().zip(digests) {
        entries[i].sha256 = Some(d);
        entries[i].size = len;
    }
    Ok(entries)
}
