//! `imageupd verify`: compare the root with the current image's manifest.
//!
//! Quick mode compares every attribute but content (size and ns mtime stand
//! in for it, like rsync's quick check); `--checksum` also hashes every file.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::engine::config::Config;
use crate::engine::stage;
use crate::format::manifest::{Entry, FileType, Manifest, RelPath};
use crate::fs::fsx;
use crate::fs::node::Node;
use crate::fs::preserve::Preserve;
use crate::fs::rootfs::RootFs;
use crate::fs::scan::{self, ScanOptions};
use crate::sys::error::ExitKind;

/// A drift report.
#[derive(Serialize, Debug, Default)]
pub struct DriftReport {
    /// Image the root should match.
    pub id: String,
    /// Paths whose attributes or content differ, with what differs.
    pub modified: Vec<Drift>,
    /// Paths of the image missing from the root.
    pub missing: Vec<String>,
    /// Paths in the root that the image does not have.
    pub extra: Vec<String>,
    /// Entries compared.
    pub checked: usize,
    /// Whether contents were hashed.
    pub checksum: bool,
}

/// One modified path.
#[derive(Serialize, Debug)]
pub struct Drift {
    /// The path.
    pub path: String,
    /// What differs (e.g. "mode", "content").
    pub what: Vec<String>,
}

impl DriftReport {
    /// True when the root matches.
    pub fn clean(&self) -> bool {
        self.modified.is_empty() && self.missing.is_empty() && self.extra.is_empty()
    }
}

/// Verify `root` against its recorded current image.
pub fn verify(root_path: &Path, checksum: bool, threads: usize) -> Result<DriftReport> {
    let root = RootFs::open(root_path).context(ExitKind::Usage)?;
    let cfg = Config::load(&root.path)?;
    let m = current_manifest(&root)?;
    let mut preserve = Preserve::new(&cfg.preserve).map_err(anyhow::Error::msg)?;
    if let Some(r) = crate::fs::rootfs::running_release() {
        let _ = preserve.add(&format!("/lib/modules/{r}/"));
        let _ = preserve.add(&format!("/usr/lib/modules/{r}/"));
    }
    let skip = vec![RelPath(stage::STAGE_AT_TOP.as_bytes().to_vec())];
    let nodes = scan::scan(
        root.fd(),
        &ScanOptions {
            preserve: Some(&preserve),
            skip,
            // verify reads every inode afresh: it is the check of last resort.
            stamps: None,
        },
    )?;
    let by_path: HashMap<&RelPath, &Node> = nodes.iter().map(|n| (&n.path, n)).collect();
    let mut r = DriftReport {
        id: m.id.clone(),
        checksum,
        ..Default::default()
    };
    let mut to_hash = Vec::new();
    let mut mount_points: Vec<&RelPath> = nodes
        .iter()
        .filter(|n| n.mountpoint)
        .map(|n| &n.path)
        .collect();
    mount_points.sort();
    let below_mount = |p: &RelPath| mount_points.iter().any(|m| p.starts_with(m) && p != *m);
    for e in &m.entries {
        if preserve.matches(&e.path) || below_mount(&e.path) {
            continue;
        }
        r.checked += 1;
        let Some(n) = by_path.get(&e.path) else {
            r.missing.push(e.path.to_string());
            continue;
        };
        if n.mountpoint {
            continue;
        }
        let what = differences(e, n, &by_path, checksum, &mut to_hash);
        if !what.is_empty() {
            r.modified.push(Drift {
                path: e.path.to_string(),
                what,
            });
        }
    }
    let in_image: std::collections::HashSet<&RelPath> = m.entries.iter().map(|e| &e.path).collect();
    for n in &nodes {
        // A directory the image lacks but a preserved path lies below (made
        // on the node, e.g. cloud-init's etc/sudoers.d) is kept by apply;
        // anything else in it is reported on its own.
        let keeps_preserved =
            n.stat.ftype == FileType::Dir && preserve.has_preserved_below(&n.path);
        if !in_image.contains(&n.path) && !below_mount(&n.path) && !keeps_preserved {
            r.extra.push(n.path.to_string());
        }
    }
    hash_contents(&root, &to_hash, threads, &mut r)?;
    r.modified.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(r)
}

/// The current image's manifest, as the node recorded it.
fn current_manifest(root: &RootFs) -> Result<Manifest> {
    let state = root.state_dir()?.ok_or_else(|| {
        anyhow!(
            "{} has no imageupd state: nothing was ever applied here",
            root.path.display()
        )
    })?;
    let bytes = fsx::read_beneath(
        state.as_fd(),
        &RelPath(crate::fs::rootfs::CURRENT_MANIFEST.to_vec()),
    )
    .with_context(|| {
        format!(
            "reading the current image's manifest in {}/var/lib/imageupd",
            root.path.display()
        )
    })?;
    crate::format::codec::decode_manifest(&bytes)
}

/// What differs between entry `e` and root node `n` but content; regular
/// files whose content is to be hashed go to `to_hash`.
fn differences<'m>(
    e: &'m Entry,
    n: &Node,
    by_path: &HashMap<&RelPath, &Node>,
    checksum: bool,
    to_hash: &mut Vec<&'m Entry>,
) -> Vec<String> {
    let mut what = Vec::new();
    let want_type = if e.ftype == FileType::Hardlink {
        FileType::File
    } else {
        e.ftype
    };
    if n.stat.ftype != want_type {
        what.push(format!(
            "type ({} instead of {})",
            n.stat.ftype.label(),
            e.ftype.label()
        ));
    } else if e.ftype == FileType::Hardlink {
        let t = RelPath(e.target.as_ref().map(|x| x.0.clone()).unwrap_or_default());
        if by_path.get(&t).is_none_or(|a| a.stat.ino != n.stat.ino) {
            what.push(format!("hardlink (not linked to {t})"));
        }
    } else {
        if e.ftype != FileType::Symlink && n.stat.mode != e.mode {
            what.push(format!("mode ({:o} instead of {:o})", n.stat.mode, e.mode));
        }
        if n.stat.uid != e.uid || n.stat.gid != e.gid {
            what.push(format!(
                "owner ({}:{} instead of {}:{})",
                n.stat.uid, n.stat.gid, e.uid, e.gid
            ));
        }
        if n.stat.mtime_ns != e.mtime_ns {
            what.push("mtime".into());
        }
        if n.xattrs != e.xattrs {
            what.push("xattrs".into());
        }
        match e.ftype {
            FileType::File => {
                if n.stat.size != e.size {
                    what.push(format!("size ({} instead of {})", n.stat.size, e.size));
                } else if checksum {
                    to_hash.push(e);
                }
            }
            FileType::Symlink
                if n.target.as_deref() != e.target.as_ref().map(|t| t.0.as_slice()) =>
            {
                what.push("symlink target".into());
            }
            FileType::Char | FileType::Block if Some(n.stat.rdev) != e.rdev => {
                what.push("device number".into());
            }
            _ => {}
        }
    }
    what
}

/// Hash the files of `to_hash` (in parallel); those whose content differs
/// are modified.
fn hash_contents(
    root: &RootFs,
    to_hash: &[&Entry],
    threads: usize,
    r: &mut DriftReport,
) -> Result<()> {
    let root_fd = root.fd();
    let bad = crate::sys::par::par_map(to_hash, threads, |e| {
        let f = fsx::open_file_beneath(root_fd, &e.path)
            .with_context(|| format!("opening {}", e.path))?;
        let (d, _) =
            crate::format::stream::digest_of(std::io::BufReader::with_capacity(256 * 1024, f))?;
        Ok((Some(d) != e.sha256).then(|| e.path.to_string()))
    })?;
    for p in bad.into_iter().flatten() {
        match r.modified.iter_mut().find(|d| d.path == p) {
            Some(d) => d.what.push("content".into()),
            None => r.modified.push(Drift {
                path: p,
                what: vec!["content".into()],
            }),
        }
    }
    Ok(())
}
