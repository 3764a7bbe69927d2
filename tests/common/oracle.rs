//! The oracles that judge a root without trusting imageupd: rsync's
//! itemized dry run and an independent metadata walk, plus snapshots for
//! "nothing changed" assertions.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use sha2::Digest as _;

use super::*;

/// The independent rsync oracle: what rsync would still change to make ROOT
/// equal IMAGE (preserve list excluded). Empty when they are equal.
#[track_caller]
pub fn oracle(image: &Path, root: &Path) -> String {
    rsync_itemize(image, root, &[])
}

/// `rsync -naHAX --delete --checksum --itemize-changes IMAGE/ ROOT/` with
/// the preserve list and `extra` (absolute rsync patterns) excluded.
fn rsync_itemize(image: &Path, root: &Path, extra: &[&str]) -> String {
    let mut args: Vec<OsString> = [
        "-naHAX",
        "--delete",
        "--checksum",
        "--numeric-ids",
        "--itemize-changes",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    for e in preserve_excludes()
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        args.push(format!("--exclude={e}").into());
    }
    let mut s = image.as_os_str().to_owned();
    s.push("/");
    let mut d = root.as_os_str().to_owned();
    d.push("/");
    args.push(s);
    args.push(d);
    cmd("rsync", args)
}

/// What kind of object a path is, with the identity of its content.
#[derive(Clone, PartialEq, Eq, Debug, PartialOrd, Ord)]
pub enum Kind {
    File { size: u64, sha256: String },
    Dir,
    Symlink(Vec<u8>),
    Char(u64),
    Block(u64),
    Fifo,
    Socket,
}

/// Everything about one path that an update must make exact.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i128,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For regular files in a hardlink group: the smallest path of the
    /// group (among scanned paths). None when alone.
    pub link_group: Option<Vec<u8>>,
    /// Inode identity, used to build link groups; not compared.
    pub dev_ino: (u64, u64),
}

/// A scanned tree: relative path (b"." for the top) → node.
pub type Tree = BTreeMap<Vec<u8>, Node>;

fn rel_join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent == b"." {
        name.to_vec()
    } else {
        let mut v = parent.to_vec();
        v.push(b'/');
        v.extend_from_slice(name);
        v
    }
}

/// Display form of a relative path.
pub fn show(rel: &[u8]) -> String {
    String::from_utf8_lossy(rel).escape_debug().to_string()
}

fn read_xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    let n = match rustix::fs::llistxattr_query(p) {
        Ok(n) => n,
        Err(e) if e == rustix::io::Errno::NOTSUP => return out,
        Err(e) => panic!("llistxattr {}: {e}", p.display()),
    };
    if n == 0 {
        return out;
    }
    let mut buf = vec![0u8; n + 256];
    let n = rustix::fs::llistxattr(p, &mut buf[..])
        .unwrap_or_else(|e| panic!("llistxattr {}: {e}", p.display()));
    for name in buf[..n].split(|&b| b == 0).filter(|s| !s.is_empty()) {
        let name_os = OsStr::from_bytes(name);
        let len = rustix::fs::lgetxattr_query(p, name_os)
            .unwrap_or_else(|e| panic!("lgetxattr {}: {e}", p.display()));
        let mut val = vec![0u8; len + 64];
        let len = rustix::fs::lgetxattr(p, name_os, &mut val[..])
            .unwrap_or_else(|e| panic!("lgetxattr {}: {e}", p.display()));
        val.truncate(len);
        out.insert(name.to_vec(), val);
    }
    out
}

/// sha256 of a file's content, hex.
pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex_of(&h.finalize())
}

/// Scan a tree without following symlinks or crossing into other
/// filesystems' content judgement; `skip(rel)` prunes a path and everything
/// below it.
pub fn scan(root: &Path, skip: &dyn Fn(&[u8]) -> bool) -> Tree {
    scan_opts(root, skip, true)
}

/// [`scan`] without reading file content when `hash` is false (the digest
/// is then empty): metadata, types, targets and link groups only.
pub fn scan_opts(root: &Path, skip: &dyn Fn(&[u8]) -> bool, hash: bool) -> Tree {
    let mut tree = Tree::new();
    let mut stack: Vec<Vec<u8>> = vec![b".".to_vec()];
    while let Some(rel) = stack.pop() {
        let p = if rel == b"." {
            root.to_path_buf()
        } else {
            root.join(OsStr::from_bytes(&rel))
        };
        let md =
            std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let ft = md.file_type();
        let kind = if ft.is_file() {
            Kind::File {
                size: md.len(),
                sha256: if hash { sha256_file(&p) } else { String::new() },
            }
        } else if ft.is_dir() {
            let mut names: Vec<Vec<u8>> = std::fs::read_dir(&p)
                .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
                .map(|e| e.expect("dir entry").file_name().into_vec())
                .collect();
            names.sort();
            for n in names.into_iter().rev() {
                let child = rel_join(&rel, &n);
                if !skip(&child) {
                    stack.push(child);
                }
            }
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink(
                std::fs::read_link(&p)
                    .expect("readlink")
                    .into_os_string()
                    .into_vec(),
            )
        } else if ft.is_char_device() {
            Kind::Char(md.rdev())
        } else if ft.is_block_device() {
            Kind::Block(md.rdev())
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            Kind::Socket
        };
        let node = Node {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime_ns: md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128,
            xattrs: read_xattrs(&p),
            link_group: None,
            dev_ino: (md.dev(), md.ino()),
        };
        tree.insert(rel, node);
    }
    // Hardlink groups among the scanned regular files.
    let mut groups: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    for (rel, n) in &tree {
        if matches!(n.kind, Kind::File { .. }) {
            groups.entry(n.dev_ino).or_default().push(rel.clone());
        }
    }
    for members in groups.values() {
        if members.len() > 1 {
            let rep = members.iter().min().expect("non-empty").clone();
            for m in members {
                tree.get_mut(m).expect("member").link_group = Some(rep.clone());
            }
        }
    }
    tree
}

/// Compare two scanned trees: every difference, one line each (empty when
/// equal). `what_a`/`what_b` name the sides in the messages.
pub fn diff_trees(a: &Tree, b: &Tree, what_a: &str, what_b: &str) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&Vec<u8>> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let p = show(k);
        match (a.get(k), b.get(k)) {
            (Some(_), None) => out.push(format!("{p}: only in {what_a}")),
            (None, Some(_)) => out.push(format!("{p}: only in {what_b}")),
            (Some(x), Some(y)) => {
                if x.kind != y.kind {
                    out.push(format!(
                        "{p}: kind/content {:?} in {what_a} vs {:?} in {what_b}",
                        x.kind, y.kind
                    ));
                }
                if x.mode != y.mode {
                    out.push(format!("{p}: mode {:o} vs {:o}", x.mode, y.mode));
                }
                if (x.uid, x.gid) != (y.uid, y.gid) {
                    out.push(format!(
                        "{p}: owner {}:{} vs {}:{}",
                        x.uid, x.gid, y.uid, y.gid
                    ));
                }
                if x.mtime_ns != y.mtime_ns {
                    out.push(format!("{p}: mtime_ns {} vs {}", x.mtime_ns, y.mtime_ns));
                }
                if x.xattrs != y.xattrs {
                    let names = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
                        m.keys().map(|n| show(n)).collect::<Vec<_>>()
                    };
                    out.push(format!(
                        "{p}: xattrs differ ({:?} vs {:?})",
                        names(&x.xattrs),
                        names(&y.xattrs)
                    ));
                }
                if x.link_group != y.link_group {
                    out.push(format!(
                        "{p}: hardlink group {:?} vs {:?}",
                        x.link_group.as_deref().map(show),
                        y.link_group.as_deref().map(show)
                    ));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

/// The metadata oracle: every difference between IMAGE and ROOT outside the
/// preserve list, including nanosecond mtimes and hardlink groups.
pub fn meta_diff(image: &Path, root: &Path) -> Vec<String> {
    let a = scan(image, &|r| is_preserved(r));
    let b = scan(root, &|r| is_preserved(r));
    diff_trees(&a, &b, "image", "root")
}

/// Assert that ROOT equals IMAGE by both oracles.
#[track_caller]
pub fn assert_converged(image: &Path, root: &Path, context: &str) {
    let r = oracle(image, root);
    let m = meta_diff(image, root);
    if !r.trim().is_empty() || !m.is_empty() {
        panic!(
            "{context}: root {} does not match image {}\n--- rsync oracle ---\n{}\n--- metadata oracle ---\n{}",
            root.display(),
            image.display(),
            clip(&r, 80),
            clip(&m.join("\n"), 80)
        );
    }
}

/// A full snapshot of a root for "nothing changed" checks: everything
/// except the engine's state area var/lib/imageupd/ (and, when given,
/// further pruned paths).
pub fn snapshot_root(root: &Path) -> Tree {
    scan(root, &|r| is_state(r))
}

/// Assert that a root is unchanged since `before` (state area excluded).
#[track_caller]
pub fn assert_unchanged(root: &Path, before: &Tree, context: &str) {
    let after = snapshot_root(root);
    let d = diff_trees(before, &after, "before", "after");
    if !d.is_empty() {
        panic!(
            "{context}: root {} changed:\n{}",
            root.display(),
            clip(&d.join("\n"), 80)
        );
    }
}

/// [`assert_converged`] on a root whose configuration preserves `extra`
/// paths too (absolute, a trailing `/` for a directory and what is below
/// it), e.g. the fragment `imageupd provision` writes for cloud-init.
#[track_caller]
pub fn assert_converged_except(image: &Path, root: &Path, extra: &[&str], context: &str) {
    // The engine keeps the directories above a preserved path even when the
    // image has none (cloud-init makes etc/sudoers.d): only such an
    // ancestor may be "only in root".
    let ancestors: Vec<String> = extra
        .iter()
        .flat_map(|e| {
            let parts: Vec<&str> = e.trim_matches('/').split('/').collect();
            (1..parts.len()).map(move |n| parts[..n].join("/"))
        })
        .collect();
    let r: String = rsync_itemize(image, root, extra)
        .lines()
        .filter(|l| {
            let d = l
                .strip_prefix("cannot delete non-empty directory: ")
                .or_else(|| l.strip_prefix("*deleting   "))
                .map(|d| d.trim_end_matches('/'));
            !d.is_some_and(|d| ancestors.iter().any(|a| a == d))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let rel: Vec<Vec<u8>> = extra
        .iter()
        .map(|e| {
            e.trim_start_matches('/')
                .trim_end_matches('/')
                .as_bytes()
                .to_vec()
        })
        .collect();
    let skip = |r: &[u8]| {
        is_preserved(r)
            || rel
                .iter()
                .any(|e| r == e.as_slice() || (r.starts_with(e) && r.get(e.len()) == Some(&b'/')))
    };
    let m: Vec<String> = diff_trees(&scan(image, &skip), &scan(root, &skip), "image", "root")
        .into_iter()
        .filter(|l| {
            !l.strip_suffix(": only in root")
                .is_some_and(|d| ancestors.iter().any(|a| a == d))
        })
        .collect();
    if !r.trim().is_empty() || !m.is_empty() {
        panic!(
            "{context}: root {} does not match image {}\n--- rsync oracle ---\n{}\n--- metadata oracle ---\n{}",
            root.display(),
            image.display(),
            clip(&r, 80),
            clip(&m.join("\n"), 80)
        );
    }
}
