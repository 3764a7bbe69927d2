//! Staging: writing every new object on the root's own filesystem, with its
//! final metadata, while services keep running. Nothing visible in the root
//! changes here; the swap later moves staged objects into place by rename.
//!
//! The staging area is `var/lib/imageupd/stage` when that directory is on
//! the root's filesystem, else `.imageupd-stage` at the top of the root.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::engine::plan::{Action, Plan};
use crate::format::manifest::Xattrs;
use crate::format::manifest::{Digest, Entry, FileType, Manifest, RelPath};
use crate::format::stream::VerifyReader;
use crate::fs::fsx::{self, Meta};
use crate::fs::sparse::{self, CopyError};
use crate::net::source::Source;
use crate::sys::error::ExitKind;
use crate::sys::fault;
use crate::sys::par::par_map;
use crate::sys::progress::Progress;

/// Preferred staging location, relative to the root.
pub const STAGE_IN_STATE: &str = "var/lib/imageupd/stage";
/// Fallback staging location when the state directory is another filesystem.
pub const STAGE_AT_TOP: &str = ".imageupd-stage";
/// Copy buffer size in bytes; also the granularity of hole detection.
const BUF: usize = 128 * 1024;
/// Staged files of at least this many bytes have their writeback started
/// as soon as they are written ([`crate::sys::writeback`]); smaller ones
/// are left to the syncfs, which batches them better.
const EARLY_WRITEBACK_BYTES: u64 = 1 << 20;

/// The staging directory.
pub struct Staging {
    /// Its path relative to the root.
    pub rel: RelPath,
    /// Pinned descriptor.
    pub fd: OwnedFd,
}

/// What staging did.
#[derive(Default, Debug, Serialize, Clone)]
pub struct StageReport {
    /// Objects written to staging.
    pub objects: u64,
    /// Content bytes written.
    pub bytes: u64,
    /// Bytes read from the source (decompressed).
    pub fetched_bytes: u64,
    /// Distinct contents read from the source.
    pub fetched_objects: u64,
    /// Bytes copied from elsewhere in the root.
    pub local_bytes: u64,
}

/// The staged name of each placed target entry.
pub type StagedNames = HashMap<usize, Vec<u8>>;

/// Remove staging leftovers from an interrupted run (both locations).
pub fn cleanup(root: BorrowedFd<'_>, dev: u64) -> Result<u64> {
    let mut n = 0;
    for loc in [STAGE_IN_STATE, STAGE_AT_TOP] {
        let rel = RelPath(loc.as_bytes().to_vec());
        let parent = rel.parent().unwrap_or_else(RelPath::root);
        let pfd = match fsx::open_dir_beneath(root, &parent) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => continue,
            Err(e) => return Err(e).with_context(|| format!("opening {parent}")),
        };
        n += fsx::remove_tree_at(pfd.as_fd(), rel.file_name(), dev)
            .with_context(|| format!("removing staging leftovers in {rel}"))?;
    }
    Ok(n)
}

/// Create a fresh staging directory on the root's filesystem.
pub fn prepare(root: BorrowedFd<'_>, dev: u64, state: BorrowedFd<'_>) -> Result<Staging> {
    let in_state = fsx::stat_fd(state).map(|s| s.dev == dev).unwrap_or(false);
    let (rel, parent) = if in_state {
        (
            RelPath(STAGE_IN_STATE.as_bytes().to_vec()),
            fsx::open_dir_beneath(state, &RelPath::root())?,
        )
    } else {
        (
            RelPath(STAGE_AT_TOP.as_bytes().to_vec()),
            fsx::open_dir_beneath(root, &RelPath::root())?,
        )
    };
    fsx::remove_tree_at(parent.as_fd(), rel.file_name(), dev)?;
    fsx::mkdir_at(parent.as_fd(), rel.file_name(), 0o700)
        .with_context(|| format!("creating staging directory {rel}"))?;
    let fd = fsx::open_dir_beneath(parent.as_fd(), &RelPath(rel.file_name().to_vec()))?;
    Ok(Staging { rel, fd })
}

/// Metadata view of an entry.
pub fn meta_of(e: &Entry) -> Meta<'_> {
    Meta {
        ftype: e.ftype,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        xattrs: &e.xattrs,
    }
}

fn staged_name(t: usize) -> Vec<u8> {
    format!("{t:x}").into_bytes()
}

/// Stage every `Place` of the plan. Regular files are written in parallel;
/// contents already in the root are copied locally (and verified); each
/// distinct content is read from the source once.
#[allow(clippy::too_many_arguments)]
pub fn stage(
    plan: &Plan,
    target: &Manifest,
    root: BorrowedFd<'_>,
    staging: &Staging,
    source: &Source,
    progress: &Progress,
    threads: usize,
) -> Result<(StagedNames, StageReport)> {
    let entries = &target.entries;
    let work = Work::of(plan, entries);
    let total: u64 = work
        .primaries
        .iter()
        .chain(&work.copies)
        .map(|&t| entries[t].size)
        .sum();
    let w = Writer {
        entries,
        plan,
        root,
        sfd: staging.fd.as_fd(),
        source,
        bar: progress.bar_objects(
            "staging",
            total,
            (work.primaries.len() + work.copies.len()) as u64,
        ),
        report: std::sync::Mutex::new(StageReport::default()),
    };
    par_map(&work.primaries, threads, |&t| {
        w.write_one(t, None)?;
        w.bar.object();
        Ok(())
    })?;
    par_map(&work.copies, threads, |&t| {
        let d = entries[t].sha256.unwrap_or(Digest([0; 32]));
        w.write_one(t, work.first_of.get(&d).copied())?;
        w.bar.object();
        Ok(())
    })?;
    w.bar.finish();
    for &t in &work.others {
        let e = &entries[t];
        let name = staged_name(t);
        stage_special(w.sfd, &name, e)
            .with_context(|| format!("staging {} {}", e.ftype.label(), e.path))?;
        if let Ok(mut r) = w.report.lock() {
            r.objects += 1;
        }
    }
    let report = w.report.into_inner().unwrap_or_default();
    Ok((work.names, report))
}

/// The plan's `Place` actions sorted by how they are staged.
struct Work {
    /// Staged name of each.
    names: StagedNames,
    /// The first file of each distinct content.
    first_of: HashMap<Digest, usize>,
    /// Files whose content is read from the root or the source.
    primaries: Vec<usize>,
    /// Files whose content is already staged for an earlier one.
    copies: Vec<usize>,
    /// Everything without content (symlinks, devices, ...).
    others: Vec<usize>,
}

impl Work {
    fn of(plan: &Plan, entries: &[Entry]) -> Work {
        let mut w = Work {
            names: StagedNames::new(),
            first_of: HashMap::new(),
            primaries: Vec::new(),
            copies: Vec::new(),
            others: Vec::new(),
        };
        for a in &plan.actions {
            if let Action::Place { t, .. } = a {
                w.names.insert(*t, staged_name(*t));
                let e = &entries[*t];
                if e.ftype == FileType::File {
                    match e.sha256 {
                        Some(d) if e.size > 0 => {
                            if let std::collections::hash_map::Entry::Vacant(v) =
                                w.first_of.entry(d)
                            {
                                v.insert(*t);
                                w.primaries.push(*t);
                            } else {
                                w.copies.push(*t);
                            }
                        }
                        _ => w.primaries.push(*t),
                    }
                } else {
                    w.others.push(*t);
                }
            }
        }
        w
    }
}

/// Writes staged regular files (shared by the staging threads).
struct Writer<'a> {
    entries: &'a [Entry],
    plan: &'a Plan,
    root: BorrowedFd<'a>,
    sfd: BorrowedFd<'a>,
    source: &'a Source,
    bar: crate::sys::progress::Bar,
    report: std::sync::Mutex<StageReport>,
}

impl<'a> Writer<'a> {
    /// Stage the regular file of entry `t`, its bytes copied from the
    /// staged file of entry `from_stage` when given.
    fn write_one(&self, t: usize, from_stage: Option<usize>) -> Result<()> {
        let e = &self.entries[t];
        let name = staged_name(t);
        let d = e
            .sha256
            .ok_or_else(|| anyhow!("{}: file without digest", e.path))?;
        let (mut fetched, mut local) = (0u64, 0u64);
        let out = match self.linked(e, &d, from_stage, &name)? {
            Some(f) => {
                fetched = e.size;
                f
            }
            None => {
                let mut out = fsx::create_file_at(self.sfd, &name)
                    .with_context(|| format!("creating staged file for {}", e.path))?;
                if e.size > 0 {
                    let reader = self.reader(e, &d, from_stage, &mut fetched, &mut local)?;
                    self.copy_verified(e, &d, reader, fetched, &mut out)?;
                }
                out.set_len(e.size)?;
                out
            }
        };
        fault::io_error("eio-stage-write")
            .with_context(|| format!("writing staged file for {}", e.path))?;
        fsx::set_meta_fd(out.as_fd(), &meta_of(e))
            .with_context(|| format!("setting owner/mode/xattrs of staged {}", e.path))?;
        fsx::set_mtime_fd(out.as_fd(), e.mtime_ns)?;
        if e.size >= EARLY_WRITEBACK_BYTES {
            if let Err(err) = crate::sys::writeback::start_writeback(out.as_fd()) {
                // Only a head start for the syncfs before the swap, which
                // reports any real failure.
                tracing::debug!("early writeback of staged {}: {err}", e.path);
            }
        }
        fault::point("mid-stage");
        if let Ok(mut r) = self.report.lock() {
            r.objects += 1;
            r.bytes += e.size;
            r.fetched_bytes += fetched;
            r.fetched_objects += u64::from(fetched > 0);
            r.local_bytes += local;
        }
        Ok(())
    }

    /// The source's fetched copy of a content the root lacks, linked into
    /// staging as `name` instead of copied (a first install writes every
    /// byte once), then verified like a copy; `None` when there is nothing
    /// to link.
    fn linked(
        &self,
        e: &Entry,
        d: &Digest,
        from_stage: Option<usize>,
        name: &[u8],
    ) -> Result<Option<File>> {
        if e.size == 0 || from_stage.is_some() || self.plan.local.contains_key(d) {
            return Ok(None);
        }
        let linked = self
            .source
            .link_content(d, self.sfd, name)
            .with_context(|| format!("linking the fetched content of {} into staging", e.path))?;
        if !linked {
            return Ok(None);
        }
        let f = fsx::open_file_beneath(self.sfd, &RelPath(name.to_vec()))
            .with_context(|| format!("opening staged {}", e.path))?;
        let reader = Box::new(crate::format::stream::CappedReader::new(
            f.try_clone()?,
            e.size,
        ));
        let verdict = VerifyReader::new(reader).finish(d, e.size);
        self.bar.inc(e.size);
        match verdict {
            Ok(Ok(())) => Ok(Some(f)),
            Ok(Err(v)) => Err(anyhow!(v))
                .with_context(|| {
                    format!(
                        "object for {} from the {} failed verification",
                        e.path,
                        self.source.describe()
                    )
                })
                .context(ExitKind::Untrusted),
            Err(err) => Err(anyhow!(err)).with_context(|| {
                format!(
                    "reading object {d} for {} from the {}",
                    e.path,
                    self.source.describe()
                )
            }),
        }
    }

    /// Where the bytes come from: an earlier staged copy, the root, or the
    /// source (counted in `fetched` or `local`).
    fn reader(
        &self,
        e: &Entry,
        d: &Digest,
        from_stage: Option<usize>,
        fetched: &mut u64,
        local: &mut u64,
    ) -> Result<Box<dyn Read + Send + 'a>> {
        let source = self.source;
        Ok(if let Some(first) = from_stage {
            *local = e.size;
            Box::new(fsx::open_file_beneath(
                self.sfd,
                &RelPath(staged_name(first)),
            )?)
        } else if let Some(p) = self.plan.local.get(d) {
            *local = e.size;
            Box::new(
                fsx::open_file_beneath(self.root, p)
                    .with_context(|| format!("opening {p} to reuse its content"))?,
            )
        } else {
            *fetched = e.size;
            source
                .open_content(d, e)
                .with_context(|| {
                    format!(
                        "object {d} for {} is missing from the {}",
                        e.path,
                        source.describe()
                    )
                })
                .context(ExitKind::Source)?
        })
    }

    /// Copy `reader` into `out` and check its digest; errors name whether
    /// the source or the local copy was at fault.
    fn copy_verified(
        &self,
        e: &Entry,
        d: &Digest,
        reader: Box<dyn Read + Send + 'a>,
        fetched: u64,
        out: &mut File,
    ) -> Result<()> {
        let source = self.source;
        let mut vr = VerifyReader::new(reader);
        match copy_sparse(&mut vr, out, &self.bar) {
            Ok(_) => {}
            // Undecodable bytes from the source: corrupt or tampered.
            Err(CopyError::Read(err)) if fetched > 0 && err.raw_os_error().is_none() => {
                return Err(anyhow!(err))
                    .with_context(|| {
                        format!(
                            "object {d} for {} from the {} is corrupt",
                            e.path,
                            source.describe()
                        )
                    })
                    .context(ExitKind::Untrusted)
            }
            Err(CopyError::Read(err)) if fetched > 0 => {
                return Err(anyhow!(err))
                    .with_context(|| {
                        format!(
                            "reading object {d} for {} from the {}",
                            e.path,
                            source.describe()
                        )
                    })
                    .context(ExitKind::Source)
            }
            Err(CopyError::Read(err)) => {
                return Err(anyhow!(err))
                    .with_context(|| format!("reading local content for {}", e.path))
            }
            Err(CopyError::Write(err)) => {
                return Err(anyhow!(err))
                    .with_context(|| format!("writing staged content of {}", e.path))
            }
        }
        match vr.finish(d, e.size)? {
            Ok(()) => Ok(()),
            Err(v) if fetched > 0 => Err(anyhow!(v))
                .with_context(|| {
                    format!(
                        "object for {} from the {} failed verification",
                        e.path,
                        source.describe()
                    )
                })
                .context(ExitKind::Untrusted),
            Err(v) => Err(anyhow!(v)).with_context(|| {
                format!("local copy of the content of {} changed under us", e.path)
            }),
        }
    }
}

fn stage_special(dir: BorrowedFd<'_>, name: &[u8], e: &Entry) -> Result<()> {
    let empty = Xattrs::new();
    match e.ftype {
        FileType::Symlink => {
            let t = e
                .target
                .as_ref()
                .ok_or_else(|| anyhow!("symlink without target"))?;
            fsx::symlink_at(dir, name, &t.0)?;
        }
        FileType::Dir => fsx::mkdir_at(dir, name, 0o700)?,
        FileType::Char | FileType::Block | FileType::Fifo | FileType::Socket => {
            fsx::mknod_at(dir, name, e.ftype, 0o600, e.rdev.unwrap_or(0))?
        }
        FileType::File | FileType::Hardlink => return Err(anyhow!("not a special object")),
    }
    fsx::set_meta_at(dir, name, &meta_of(e), &empty)?;
    if e.ftype != FileType::Dir {
        fsx::set_mtime_at(dir, name, e.mtime_ns)?;
    }
    Ok(())
}

/// Copy leaving holes where whole blocks are zero, so sparse files stay sparse.
fn copy_sparse<R: Read>(
    r: &mut R,
    out: &mut File,
    bar: &crate::sys::progress::Bar,
) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; BUF];
    sparse::copy(r, out, &mut buf, |n| bar.inc(n))
}
