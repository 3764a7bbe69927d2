//! The node's stamp cache: what the last walk of the root read from each
//! inode that `stat` alone does not tell (xattrs, symlink target), keyed by
//! path and stamped with the inode number and ctime it was read at.
//!
//! The kernel moves an inode's ctime forward on every change of its xattrs,
//! content, mode, owner or link count, and userspace cannot set it back; a
//! symlink's target cannot change at all without a new inode. So when a
//! later walk finds the same inode with the same ctime, the cached xattrs
//! and target are still exact, and the two syscalls per object that
//! dominate a walk (`llistxattr` through `/proc/self/fd`, `readlinkat`)
//! can be skipped. This is the same bargain git's index makes, with
//! ctime-racy entries left out the same way: an inode whose ctime is within
//! [`RACY_NS`] of the walk's start is not cached, because a second change in
//! the same clock tick would keep its ctime.
//!
//! The file lives in the state directory as [`FILE`]. It is only a cache:
//! a missing, torn or foreign file (checked by magic, device and a trailing
//! sha256) is ignored and the walk reads everything. Encoding: [`MAGIC`],
//! u64 device (LE), varint count, then per object: varint path length,
//! path, varint inode, zigzag varint ctime (ns), varint xattr count, per
//! xattr varint length + name and varint length + value, then a flag byte
//! (bit 0: a symlink target follows as varint length + bytes; bit 1: a
//! 32-byte content digest follows); finally the sha256 of everything
//! before it.
//!
//! A regular file's stamp also carries the content digest the run knew for
//! it, so that an unchanged inode's content is known on the next run without
//! the record of the current image (whose parse is most of a hotfix's
//! planning time).

use std::io;
use std::os::fd::BorrowedFd;

use anyhow::{anyhow, bail, Result};

use crate::format::manifest::{tree_order, Digest, RawBytes, RelPath, XattrValue, Xattrs};
use crate::fs::fsx::{self, Stat};
use crate::fs::node::Node;

/// File name of the cache inside the state directory.
pub const FILE: &[u8] = b"scan.stamps";
/// First bytes of the file.
pub const MAGIC: &[u8; 8] = b"IUSTAMP1";
/// An inode whose ctime is this close to (or after) the start of the walk
/// is not cached, in ns: timestamps come from a coarse clock, so a second
/// change within one tick could leave the ctime as the walk saw it.
pub const RACY_NS: i64 = 2_000_000_000;
/// Largest cache file read, in bytes.
pub const MAX_BYTES: usize = 256 << 20;

/// What the walk read from one inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// Inode number at the time.
    pub ino: u64,
    /// ctime in ns since the epoch at the time.
    pub ctime_ns: i64,
    /// Its content digest, for a regular file whose content the run knew
    /// (recorded, quick-checked against the image, or hashed).
    pub digest: Option<Digest>,
    /// Xattrs and symlink target, when it has either (most inodes have
    /// neither: kept out of line, a pointer per stamp).
    extra: Option<Box<Extra>>,
}

/// The rarely present part of a stamp.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Extra {
    xattrs: Xattrs,
    target: Option<Vec<u8>>,
}

impl Stamp {
    /// Its xattrs.
    pub fn xattrs(&self) -> Xattrs {
        self.extra
            .as_ref()
            .map(|e| e.xattrs.clone())
            .unwrap_or_default()
    }

    /// Its target, for a symlink.
    pub fn target(&self) -> Option<Vec<u8>> {
        self.extra.as_ref().and_then(|e| e.target.clone())
    }
}

/// The checksum of an encoded stamp cache (its trailing sha256).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StampSum([u8; 32]);

impl StampSum {
    /// True when `encoded` (what [`encode_nodes`] wrote) has this checksum.
    pub fn same_as(&self, encoded: &[u8]) -> bool {
        encoded.len() >= 32 && encoded[encoded.len() - 32..] == self.0
    }
}

/// The cache of one filesystem: stamps in tree order
/// ([`RelPath::tree_cmp`]), found by binary search.
#[derive(Clone, Debug, Default)]
pub struct Stamps {
    /// Device of the filesystem the stamps belong to.
    pub dev: u64,
    entries: Vec<(Box<[u8]>, Stamp)>,
    /// The checksum of the file it was read from, if read from one.
    sum: Option<[u8; 32]>,
}

impl PartialEq for Stamps {
    fn eq(&self, other: &Self) -> bool {
        self.dev == other.dev && self.entries == other.entries
    }
}

impl Eq for Stamps {}

/// True when `n` belongs in the stamps of a walk of `dev` that started at
/// `walk_start_ns`: not a mount point, not ctime-racy.
fn stampable(dev: u64, n: &Node, walk_start_ns: i64) -> bool {
    !n.mountpoint && n.stat.dev == dev && n.stat.ctime_ns < walk_start_ns.saturating_sub(RACY_NS)
}

/// The stamp of walked node `n`, whose content the run knew as `d`.
fn stamp_of(n: &Node, d: Option<Digest>) -> Stamp {
    let extra = (!n.xattrs.is_empty() || n.target.is_some()).then(|| {
        Box::new(Extra {
            xattrs: n.xattrs.clone(),
            target: n.target.clone(),
        })
    });
    Stamp {
        ino: n.stat.ino,
        ctime_ns: n.stat.ctime_ns,
        digest: if n.stat.ftype == crate::format::manifest::FileType::File {
            d
        } else {
            None
        },
        extra,
    }
}

impl Stamps {
    /// The cached reading of `path`, if `st` shows the very same inode
    /// unchanged since.
    pub fn lookup(&self, path: &RelPath, st: &Stat) -> Option<&Stamp> {
        if st.dev != self.dev {
            return None;
        }
        let i = self
            .entries
            .binary_search_by(|(p, _)| tree_order(p, &path.0))
            .ok()?;
        let s = &self.entries[i].1;
        (s.ino == st.ino && s.ctime_ns == st.ctime_ns).then_some(s)
    }

    /// Number of cached objects.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when `encoded` (what [`encode_nodes`] wrote) holds exactly the
    /// cache this was read from.
    pub fn same_as(&self, encoded: &[u8]) -> bool {
        self.sum().is_some_and(|s| s.same_as(encoded))
    }

    /// The checksum of the file this was read from: all a caller needs to
    /// keep once the walk is done (the cache itself is a few hundred bytes
    /// per object).
    pub fn sum(&self) -> Option<StampSum> {
        self.sum.map(StampSum)
    }

    /// The stamps of a walk of the filesystem `dev` that started at
    /// `walk_start_ns` (ns since the epoch): every object except mount
    /// points and ctime-racy inodes. `digests` holds the content digest the
    /// run knew for each node (same length as `nodes`); `nodes` are in
    /// tree order, as a walk returns them.
    pub fn from_nodes(
        dev: u64,
        nodes: &[Node],
        digests: &[Option<Digest>],
        walk_start_ns: i64,
    ) -> Stamps {
        let entries = nodes
            .iter()
            .zip(digests.iter().chain(std::iter::repeat(&None)))
            .filter(|(n, _)| stampable(dev, n, walk_start_ns))
            .map(|(n, d)| (n.path.0.clone().into_boxed_slice(), stamp_of(n, *d)))
            .collect::<Vec<_>>();
        let mut entries = entries;
        if !entries
            .windows(2)
            .all(|w| tree_order(&w[0].0, &w[1].0).is_lt())
        {
            entries.sort_by(|a, b| tree_order(&a.0, &b.0));
        }
        Stamps {
            dev,
            entries,
            sum: None,
        }
    }

    /// Serialise (see the module documentation), in tree order so equal
    /// caches give equal bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = head(self.dev, self.entries.len());
        for (p, s) in &self.entries {
            put_stamp(&mut out, p, s);
        }
        finish(out)
    }

    /// Parse what [`Self::encode`] or [`encode_nodes`] wrote.
    pub fn decode(b: &[u8]) -> Result<Stamps> {
        if b.len() < MAGIC.len() + 8 + 32 || &b[..MAGIC.len()] != MAGIC {
            bail!("not a stamp cache");
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if Digest::of(body).0 != sum {
            bail!("stamp cache checksum mismatch");
        }
        let mut pos = MAGIC.len();
        let dev = u64::from_le_bytes(body[pos..pos + 8].try_into()?);
        pos += 8;
        let n = get(body, &mut pos)?;
        // Each object takes at least 5 bytes: a sanity bound on the count.
        if n > (body.len() / 5) as u64 {
            bail!("stamp cache claims {n} objects");
        }
        let mut entries: Vec<(Box<[u8]>, Stamp)> = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let path: Box<[u8]> = get_bytes(body, &mut pos)?.into();
            let ino = get(body, &mut pos)?;
            let z = get(body, &mut pos)?;
            let ctime_ns = ((z >> 1) as i64) ^ -((z & 1) as i64);
            let nx = get(body, &mut pos)?;
            let mut xattrs = Xattrs::new();
            for _ in 0..nx {
                let k = get_bytes(body, &mut pos)?.to_vec();
                let v = get_bytes(body, &mut pos)?.to_vec();
                xattrs.insert(RawBytes(k), XattrValue(v));
            }
            let flag = *body
                .get(pos)
                .ok_or_else(|| anyhow!("stamp cache is truncated"))?;
            pos += 1;
            if flag > 3 {
                bail!("stamp cache has a bad flag {flag}");
            }
            let target = match flag & 1 {
                1 => Some(get_bytes(body, &mut pos)?.to_vec()),
                _ => None,
            };
            let digest = match flag & 2 {
                2 => {
                    let b = body
                        .get(pos..pos + 32)
                        .ok_or_else(|| anyhow!("stamp cache is truncated"))?;
                    pos += 32;
                    Some(Digest(b.try_into()?))
                }
                _ => None,
            };
            let extra = (!xattrs.is_empty() || target.is_some())
                .then(|| Box::new(Extra { xattrs, target }));
            entries.push((
                path,
                Stamp {
                    ino,
                    ctime_ns,
                    digest,
                    extra,
                },
            ));
        }
        if pos != body.len() {
            bail!("stamp cache has trailing bytes");
        }
        // Written in tree order; a file that is not is sorted (it is only
        // a cache: a duplicate path makes it unusable).
        if !entries
            .windows(2)
            .all(|w| tree_order(&w[0].0, &w[1].0).is_lt())
        {
            entries.sort_by(|a, b| tree_order(&a.0, &b.0));
            if entries
                .windows(2)
                .any(|w| tree_order(&w[0].0, &w[1].0).is_eq())
            {
                bail!("stamp cache names a path twice");
            }
        }
        Ok(Stamps {
            dev,
            entries,
            sum: Some(sum.try_into()?),
        })
    }
}

/// The encoded stamps of a walk (what [`Stamps::from_nodes`] then
/// [`Stamps::encode`] give), written straight from the walk's nodes: no
/// cache is built in memory.
pub fn encode_nodes(
    dev: u64,
    nodes: &[Node],
    digests: &[Option<Digest>],
    walk_start_ns: i64,
) -> Vec<u8> {
    let keep = |(n, _): &(&Node, &Option<Digest>)| stampable(dev, n, walk_start_ns);
    let pairs = || {
        nodes
            .iter()
            .zip(digests.iter().chain(std::iter::repeat(&None)))
    };
    let mut out = head(dev, pairs().filter(keep).count());
    for (n, d) in pairs().filter(keep) {
        put_stamp(&mut out, &n.path.0, &stamp_of(n, *d));
    }
    finish(out)
}

fn head(dev: u64, count: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + count * 48);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&dev.to_le_bytes());
    put(&mut out, count as u64);
    out
}

fn put_stamp(out: &mut Vec<u8>, path: &[u8], s: &Stamp) {
    put_bytes(out, path);
    put(out, s.ino);
    put(out, ((s.ctime_ns << 1) ^ (s.ctime_ns >> 63)) as u64);
    let (xattrs, target) = match &s.extra {
        Some(e) => (Some(&e.xattrs), e.target.as_ref()),
        None => (None, None),
    };
    put(out, xattrs.map_or(0, |x| x.len()) as u64);
    for (k, v) in xattrs.into_iter().flatten() {
        put_bytes(out, &k.0);
        put_bytes(out, &v.0);
    }
    out.push(u8::from(target.is_some()) | (u8::from(s.digest.is_some()) << 1));
    if let Some(t) = target {
        put_bytes(out, t);
    }
    if let Some(d) = &s.digest {
        out.extend_from_slice(&d.0);
    }
}

fn finish(mut out: Vec<u8>) -> Vec<u8> {
    let sum = Digest::of(&out);
    out.extend_from_slice(&sum.0);
    out
}

fn put(out: &mut Vec<u8>, v: u64) {
    crate::format::varint::put(out, v);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn get(b: &[u8], pos: &mut usize) -> Result<u64> {
    crate::format::varint::get(b, pos).map_err(|e| anyhow!("stamp cache: {e}"))
}

fn get_bytes<'a>(b: &'a [u8], pos: &mut usize) -> Result<&'a [u8]> {
    let n = get(b, pos)? as usize;
    let end = pos
        .checked_add(n)
        .filter(|&e| e <= b.len())
        .ok_or_else(|| anyhow!("stamp cache is truncated"))?;
    let s = &b[*pos..end];
    *pos = end;
    Ok(s)
}

/// The cache in the state directory, or `None` when there is none or it is
/// unusable (logged; the walk then reads everything).
pub fn load(state: BorrowedFd<'_>) -> Option<Stamps> {
    match fsx::read_at_limited(state, FILE, MAX_BYTES) {
        Ok(b) => match Stamps::decode(&b) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::info!("ignoring the stamp cache: {e:#}");
                None
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::info!("ignoring the stamp cache: {e}");
            None
        }
    }
}

/// Wall-clock time now, in ns since the epoch (the walk's start for
/// [`Stamps::from_nodes`]).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Replace the cache in the state directory (temp + rename, no fsync: a
/// torn file after a power loss fails its checksum and is ignored).
pub fn save(state: BorrowedFd<'_>, encoded: &[u8]) -> io::Result<()> {
    fsx::write_renamed(state, FILE, encoded, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::FileType;

    fn node(path: &str, ino: u64, ctime_ns: i64, cap: bool, target: Option<&str>) -> Node {
        let mut xattrs = Xattrs::new();
        if cap {
            xattrs.insert(
                RawBytes(b"security.capability".to_vec()),
                XattrValue(vec![1, 0, 0, 2, 0x20]),
            );
        }
        Node {
            path: RelPath(path.as_bytes().to_vec()),
            stat: Stat {
                ftype: if target.is_some() {
                    FileType::Symlink
                } else {
                    FileType::File
                },
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 3,
                mtime_ns: 5,
                ctime_ns,
                dev: 7,
                ino,
                nlink: 1,
                rdev: 0,
            },
            xattrs,
            target: target.map(|t| t.as_bytes().to_vec()),
            mountpoint: false,
            cached: false,
            known: None,
        }
    }

    const NOW: i64 = 1_800_000_000_000_000_000;

    #[test]
    fn round_trip_and_lookup_needs_same_inode_and_ctime() {
        let nodes = vec![
            node("usr/bin/ping", 10, NOW - 10 * RACY_NS, true, None),
            node("usr/bin/sh", 11, NOW - 10 * RACY_NS, false, Some("dash")),
            node("etc/fresh", 12, NOW - RACY_NS / 2, false, None),
            node("etc/neg", 13, -5, false, None),
        ];
        let digests = vec![
            Some(Digest::of(b"ping")),
            Some(Digest::of(b"x")),
            None,
            None,
        ];
        let s = Stamps::from_nodes(7, &nodes, &digests, NOW);
        assert_eq!(s.len(), 3, "the racy inode is left out");
        let back = Stamps::decode(&s.encode()).expect("decodes");
        assert_eq!(back, s);
        // A walk's nodes come in tree order; so does the encoding.
        let mut order: Vec<usize> = (0..nodes.len()).collect();
        order.sort_by(|&a, &b| nodes[a].path.tree_cmp(&nodes[b].path));
        let walked: Vec<Node> = order.iter().map(|&i| nodes[i].clone()).collect();
        let walked_digests: Vec<_> = order.iter().map(|&i| digests[i]).collect();
        assert_eq!(encode_nodes(7, &walked, &walked_digests, NOW), s.encode());
        assert!(back.same_as(&s.encode()));
        assert!(
            !s.same_as(&s.encode()),
            "only a cache read from a file knows its sum"
        );
        let hit = back.lookup(&nodes[0].path, &nodes[0].stat).expect("hit");
        assert_eq!(hit.xattrs(), nodes[0].xattrs);
        assert_eq!(hit.digest, Some(Digest::of(b"ping")));
        assert_eq!(
            back.lookup(&nodes[1].path, &nodes[1].stat)
                .and_then(|h| h.digest),
            None,
            "only regular files carry a digest"
        );
        assert_eq!(
            back.lookup(&nodes[1].path, &nodes[1].stat)
                .and_then(|h| h.target()),
            Some(b"dash".to_vec())
        );
        assert!(back.lookup(&nodes[2].path, &nodes[2].stat).is_none());
        assert!(back.lookup(&nodes[3].path, &nodes[3].stat).is_some());
        let mut changed = nodes[0].stat;
        changed.ctime_ns += 1;
        assert!(back.lookup(&nodes[0].path, &changed).is_none());
        let mut other = nodes[0].stat;
        other.ino = 99;
        assert!(back.lookup(&nodes[0].path, &other).is_none());
        let mut elsewhere = nodes[0].stat;
        elsewhere.dev = 8;
        assert!(back.lookup(&nodes[0].path, &elsewhere).is_none());
    }

    #[test]
    fn tree_order_matches_relpath_tree_cmp() {
        let paths = [
            ".", "a", "a/b", "a.b", "a-b", "ab", "a/b/c", "a/bc", "b", "-x", "a/-",
        ];
        for x in paths {
            for y in paths {
                let (px, py) = (
                    RelPath(x.as_bytes().to_vec()),
                    RelPath(y.as_bytes().to_vec()),
                );
                assert_eq!(
                    tree_order(x.as_bytes(), y.as_bytes()),
                    px.tree_cmp(&py),
                    "{x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn damaged_files_are_rejected() {
        let nodes = vec![
            node("a", 1, 1, true, None),
            node("b", 2, 1, false, Some("a")),
        ];
        let good = Stamps::from_nodes(7, &nodes, &[Some(Digest::of(b"a")), None], NOW).encode();
        for cut in [0, 8, 20, good.len() - 1] {
            assert!(Stamps::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = good.clone();
        flipped[20] ^= 1;
        assert!(Stamps::decode(&flipped).is_err());
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(Stamps::decode(&magic).is_err());
        // A well-formed checksum over garbage still fails to parse cleanly.
        let mut junk = MAGIC.to_vec();
        junk.extend_from_slice(&7u64.to_le_bytes());
        junk.extend_from_slice(&[0xff; 12]);
        let sum = Digest::of(&junk);
        junk.extend_from_slice(&sum.0);
        assert!(Stamps::decode(&junk).is_err());
    }
}
