//! `imageupd publish`: ingest a built image into the store.
//!
//! Sources: a directory, a `.tar`, `.tar.gz`/`.tgz`, `.tar.zst` archive
//! (unpacked by GNU tar into the store's scratch space with xattrs, devices,
//! hardlinks and numeric owners intact, then walked like a directory), or a
//! `.raw`/`.qcow2`/`.img` disk image (its root filesystem mounted read-only
//! and walked; the image itself kept under `disks/<id>/`, see
//! [`crate::publish::disk`]).
//!
//! Besides loose objects, every image gets packs and a signed pack index
//! ([`crate::format::pack`]) so that HTTP clients need few requests, and an image
//! published with `--parent P` an update delta from P ([`crate::format::delta`]).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::format::kernel;
use crate::format::manifest::{self, FileType, Manifest, FORMAT_VERSION};
use crate::format::sign;
use crate::fs::fsx;
use crate::fs::scan::{self, ScanOptions};
use crate::fs::store::{self, Store};
use crate::sys::error::ExitKind;
use crate::sys::progress::Progress;

/// Default zstd level for objects: a balance of publish time and transfer size.
pub const DEFAULT_LEVEL: i32 = 10;

/// What to publish.
pub struct PublishOptions {
    /// Store directory (created if new).
    pub store: PathBuf,
    /// Image id.
    pub id: String,
    /// Signing keys (each adds a signature line: a k-of-n targets role
    /// needs k of them); none publishes unsigned.
    pub keys: Vec<PathBuf>,
    /// Online key that re-signs the store's index (`timestamp.json`) after
    /// the image is written; `None` leaves the index as it is.
    pub timestamp_key: Option<PathBuf>,
    /// Lifetime of that index, in hours.
    pub timestamp_hours: u64,
    /// Parent image id.
    pub parent: Option<String>,
    /// `--no-delta`: without `--parent`, write no update delta from the
    /// store's newest image (see [`auto_delta_from`]).
    pub no_delta: bool,
    /// zstd level for new objects.
    pub level: i32,
    /// Worker threads for hashing and compression.
    pub threads: usize,
    /// Release channel (`--channel`, default `default`).
    pub channel: String,
    /// `--release`: the release number (default: one above the channel's highest).
    pub release: Option<u64>,
    /// `--compatible`: the node role the image is for.
    pub compatible: Option<String>,
}

/// Result summary.
#[derive(Serialize, Debug)]
pub struct PublishReport {
    /// Image id.
    pub id: String,
    /// Release channel.
    pub channel: String,
    /// Release number on the channel.
    pub release: u64,
    /// Entries in the manifest.
    pub entries: usize,
    /// Content bytes of regular files.
    pub content_bytes: u64,
    /// Objects newly written.
    pub new_objects: usize,
    /// Compressed bytes newly written.
    pub new_object_bytes: u64,
    /// Objects already present (shared with earlier images).
    pub reused_objects: usize,
    /// Whether the manifest was signed.
    pub signed: bool,
    /// Kernel release found in the image.
    pub kernel: Option<String>,
    /// Disk images kept as provisioning artifacts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::fs::store::DiskEntry>,
    /// Packs written for HTTP clients.
    pub packs: crate::publish::pack::PackReport,
    /// The update delta from the parent image (`--parent` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<crate::publish::delta::DeltaReport>,
    /// Wall time in ms.
    pub duration_ms: u64,
}

/// The kind of source, decided by its type and name.
enum SourceKind {
    Dir,
    Tar(Option<&'static str>),
    Disk,
}

fn source_kind(p: &Path) -> Result<SourceKind> {
    if p.is_dir() {
        return Ok(SourceKind::Dir);
    }
    if !p.is_file() {
        bail!(
            "source {} does not exist or is neither a directory nor a file",
            p.display()
        );
    }
    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    if name.ends_with(".tar") {
        Ok(SourceKind::Tar(None))
    } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Ok(SourceKind::Tar(Some("--gzip")))
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        Ok(SourceKind::Tar(Some("--zstd")))
    } else if crate::publish::disk::is_disk_name(name) {
        Ok(SourceKind::Disk)
    } else {
        bail!("don't know how to publish {name}: expected a directory, .tar, .tar.gz, .tgz, .tar.zst, .raw, .qcow2 or .img")
    }
}

/// Publish `source` as image `opts.id`.
pub fn publish(opts: &PublishOptions, source: &Path, progress: &Progress) -> Result<PublishReport> {
    let t0 = Instant::now();
    let (key, kind, st) = check_request(opts, source)?;
    let release = crate::publish::release::assign(&st, &opts.channel, opts.release)?;
    let mut tree = Tree::open(&st, kind, source, progress)?;
    let root = fsx::open_dir(&tree.path)
        .with_context(|| format!("opening source {}", tree.path.display()))?;
    let entries = scan_tree(&root, &tree.path, opts.threads, progress)?;
    let objects = store_objects(&st, &root, &entries, opts, progress)?;
    drop(root);
    if let Some(m) = tree.mounted.take() {
        m.close()
            .context("releasing the disk image's root filesystem")?;
    }
    let disk = tree.disk.as_ref().map(|d| d.artifact());
    let m = manifest_of(opts, release, entries, disk)?;
    let written = write_image(&st, &m, &key, tree.disk.take(), opts, progress)?;
    if let Some(k) = &opts.timestamp_key {
        let v = crate::publish::trust::timestamp(&st, k, opts.timestamp_hours)
            .context("the image is published, but re-signing the store's index failed")?;
        progress.line(&format!("signed the store's index, version {v}"));
    }
    Ok(PublishReport {
        id: m.id.clone(),
        channel: opts.channel.clone(),
        release,
        entries: m.entries.len(),
        content_bytes: m.content_bytes(),
        new_objects: objects.new,
        new_object_bytes: objects.new_bytes,
        reused_objects: objects.reused,
        signed: written.signed,
        kernel: m.kernel.as_ref().map(|k| k.release.clone()),
        disks: written.disks,
        packs: written.packs,
        delta: written.delta,
        duration_ms: t0.elapsed().as_millis() as u64,
    })
}

/// Check the ids, load the key, tell what the source is and open the store
/// (which must not hold the image yet, and must hold its parent).
fn check_request(
    opts: &PublishOptions,
    source: &Path,
) -> Result<(Vec<ed25519_dalek::SigningKey>, SourceKind, Store)> {
    manifest::validate_image_id(&opts.id)
        .map_err(anyhow::Error::msg)
        .context(ExitKind::Usage)?;
    if let Some(p) = &opts.parent {
        manifest::validate_image_id(p)
            .map_err(anyhow::Error::msg)
            .context(ExitKind::Usage)?;
    }
    let key = opts
        .keys
        .iter()
        .map(|k| sign::load_secret(k))
        .collect::<Result<Vec<_>>>()?;
    let kind = source_kind(source).context(ExitKind::Source)?;
    let st = Store::create_or_open(&opts.store)?;
    if st.has_image(&opts.id) {
        bail!(
            "image {:?} already exists in {}; image ids are immutable, pick a new id",
            opts.id,
            opts.store.display()
        );
    }
    if let Some(p) = &opts.parent {
        if !st.has_image(p) {
            bail!("parent image {p:?} is not in {}", opts.store.display());
        }
    }
    Ok((key, kind, st))
}

/// The tree to publish: the source directory, a tarball unpacked into the
/// store's scratch space, or a disk image's root filesystem, mounted.
struct Tree {
    path: PathBuf,
    /// Dropped (unmounted) before the staged disk image it is on.
    mounted: Option<crate::publish::disk::MountedRoot>,
    disk: Option<crate::publish::disk::StagedDisk>,
    _unpacked: Option<tempfile::TempDir>,
}

impl Tree {
    fn open(st: &Store, kind: SourceKind, source: &Path, progress: &Progress) -> Result<Tree> {
        let mut tree = Tree {
            path: source.to_path_buf(),
            mounted: None,
            disk: None,
            _unpacked: None,
        };
        match kind {
            SourceKind::Dir => {}
            SourceKind::Tar(flag) => {
                let dir = tempfile::Builder::new()
                    .prefix("unpack-")
                    .tempdir_in(st.tmp_dir()?)?;
                progress.line(&format!("unpacking {}", source.display()));
                unpack_tar(source, flag, dir.path())?;
                tree.path = dir.path().to_path_buf();
                tree._unpacked = Some(dir);
            }
            SourceKind::Disk => {
                progress.line(&format!("copying disk image {}", source.display()));
                let d = crate::publish::disk::stage(st, source)?;
                let m = crate::publish::disk::mount_root(&d.path, d.format, &st.tmp_dir()?)
                    .with_context(|| format!("finding the root filesystem in {}", source.display()))
                    .context(ExitKind::Source)?;
                progress.line(&format!(
                    "root filesystem: partition {} ({:?}, {} bytes) of {} image {}",
                    m.chosen.number,
                    m.chosen.fs,
                    m.chosen.size,
                    d.format.as_str(),
                    d.name
                ));
                tree.path = m.path().to_path_buf();
                tree.disk = Some(d);
                tree.mounted = Some(m);
            }
        }
        Ok(tree)
    }
}

/// Scan the tree into manifest entries (contents hashed).
fn scan_tree(
    root: &std::os::fd::OwnedFd,
    path: &Path,
    threads: usize,
    progress: &Progress,
) -> Result<Vec<crate::format::manifest::Entry>> {
    progress.line(&format!("scanning {}", path.display()));
    let nodes = scan::scan(root.as_fd(), &ScanOptions::default())?;
    if let Some(m) = nodes.iter().find(|n| n.mountpoint) {
        progress.line(&format!(
            "note: {} is another filesystem; only its mount point is recorded",
            m.path
        ));
    }
    scan::to_entries(root.as_fd(), &nodes, threads)
}

/// What storing the objects did.
struct Objects {
    new: usize,
    new_bytes: u64,
    reused: usize,
}

/// Store the objects: only the digests the store does not hold yet, each
/// once, compressed in parallel.
fn store_objects(
    st: &Store,
    root: &std::os::fd::OwnedFd,
    entries: &[crate::format::manifest::Entry],
    opts: &PublishOptions,
    progress: &Progress,
) -> Result<Objects> {
    let mut seen = std::collections::HashSet::new();
    let mut todo = Vec::new();
    let mut reused = 0usize;
    for e in entries {
        if e.ftype != FileType::File || e.size == 0 {
            continue;
        }
        let Some(d) = e.sha256 else { continue };
        if !seen.insert(d) {
            continue;
        }
        if st.has_object(&d) {
            reused += 1;
        } else {
            todo.push((d, e.path.clone(), e.size));
        }
    }
    let total: u64 = todo.iter().map(|t| t.2).sum();
    let bar = progress.bar("compressing", total);
    let sizes = crate::sys::par::par_map(&todo, opts.threads, |(d, p, size)| {
        let f = fsx::open_file_beneath(root.as_fd(), p).with_context(|| format!("opening {p}"))?;
        let n = st
            .put_object_sized(
                d,
                std::io::BufReader::with_capacity(256 * 1024, f),
                Some(*size),
                opts.level,
            )
            .with_context(|| format!("storing {p}"))?;
        bar.inc(*size);
        Ok(n)
    })?;
    bar.finish();
    Ok(Objects {
        new: todo.len(),
        new_bytes: sizes.iter().sum(),
        reused,
    })
}

/// The image's manifest, validated; `disk` records a disk image source.
fn manifest_of(
    opts: &PublishOptions,
    release: u64,
    entries: Vec<crate::format::manifest::Entry>,
    disk: Option<crate::format::manifest::DiskArtifact>,
) -> Result<Manifest> {
    let kernel = kernel::detect(&entries);
    let m = Manifest {
        format: FORMAT_VERSION,
        id: opts.id.clone(),
        parent: opts.parent.clone(),
        created: crate::sys::clock::now_rfc3339(),
        kernel,
        channel: Some(opts.channel.clone()),
        release: Some(release),
        compatible: opts.compatible.clone(),
        disk,
        entries,
    };
    m.validate()
        .context("the scanned tree does not form a valid manifest")?;
    Ok(m)
}

/// What writing the image into the store produced.
struct Written {
    signed: bool,
    packs: crate::publish::pack::PackReport,
    delta: Option<crate::publish::delta::DeltaReport>,
    disks: Vec<crate::fs::store::DiskEntry>,
}

/// Without `--parent` (a CI job publishing builds as they come): the image
/// an update delta is written from anyway, the store's newest, when it
/// shares at least half of this image's objects (an unrelated image gets
/// none: its delta would be about the whole image). The manifest is framed
/// after that image's (see [`encode_framed`]), so its nodes rebuild the
/// stored bytes from the delta as from a parent's.
fn auto_delta_from(
    opts: &PublishOptions,
    reuse: &[String],
    packs: &crate::publish::pack::PackReport,
) -> Option<String> {
    let newest = reuse.first()?;
    let total = packs.shared_with_first + packs.packed_objects;
    let related = total > 0 && packs.shared_with_first * 2 >= total;
    (!opts.no_delta && related).then(|| newest.clone())
}

/// The manifest's stored bytes and frames: framed after the parent's (the
/// update delta rebuilds these bytes from it), else after the most recent
/// image's when it reads (only to share frames; a broken one is skipped).
fn encode_framed(
    st: &Store,
    m: &Manifest,
    parent: Option<&str>,
    recent: Option<&String>,
) -> Result<(Vec<u8>, crate::format::mframes::FrameList)> {
    use crate::format::codec::{encode_manifest_framed, encode_manifest_framed_child};
    if let Some(p) = parent {
        let (parent, _) = st.read_manifest_raw(p)?;
        return encode_manifest_framed_child(m, &parent);
    }
    match recent.map(|r| (r, st.read_manifest_raw(r))) {
        Some((_, Ok((other, _)))) => encode_manifest_framed_child(m, &other),
        Some((r, Err(e))) => {
            tracing::warn!("not sharing manifest frames with image {r:?}: {e:#}");
            encode_manifest_framed(m)
        }
        None => encode_manifest_framed(m),
    }
}

/// Write the image: its packs and their index, the manifest's frames, the
/// update delta from the parent, the disk image, then the signed manifest
/// itself (last: the image exists once it is there).
fn write_image(
    st: &Store,
    m: &Manifest,
    key: &[ed25519_dalek::SigningKey],
    disk: Option<crate::publish::disk::StagedDisk>,
    opts: &PublishOptions,
    progress: &Progress,
) -> Result<Written> {
    // The images whose packs are reused; the first also lends its manifest
    // frames (a node on it fetches only the frames it lacks).
    let reuse = crate::publish::pack::reuse_from(st, &m.id, opts.parent.as_deref())?;
    let (stored, frames) = encode_framed(st, m, opts.parent.as_deref(), reuse.first())?;
    let sig = (!key.is_empty()).then(|| sign::sign_all(key, &stored));
    progress.line("writing packs");
    let (pidx, packs) = crate::publish::pack::build(st, m, &stored, &reuse, opts.level)?;
    let psig = (!key.is_empty()).then(|| sign::sign_all(key, &pidx));
    crate::publish::pack::put_index(st, &m.id, &pidx, psig.as_deref())?;
    store::write_atomic(
        &st.image_dir(&m.id)
            .join(crate::format::mframes::FRAMES_NAME),
        &serde_json::to_vec(&frames)?,
    )?;
    let from = opts
        .parent
        .clone()
        .or_else(|| auto_delta_from(opts, &reuse, &packs));
    let delta = match from.as_deref() {
        Some(p) => {
            progress.line(&format!("writing the update delta from {p}"));
            Some(
                crate::publish::delta::build(st, m, &stored, sig.as_deref(), p, opts.threads)
                    .with_context(|| format!("writing the update delta from {p:?}"))?,
            )
        }
        None => None,
    };
    let disks = match disk {
        Some(d) => vec![d.install(st, &m.id)?],
        None => Vec::new(),
    };
    st.put_image_with(m, &stored, sig.as_deref(), disks.clone())?;
    Ok(Written {
        signed: sig.is_some(),
        packs,
        delta,
        disks,
    })
}

fn unpack_tar(archive: &Path, flag: Option<&str>, dest: &Path) -> Result<()> {
    let mut cmd = std::process::Command::new("tar");
    cmd.arg("--extract")
        .arg("--file")
        .arg(archive)
        .arg("--directory")
        .arg(dest)
        .args([
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "--same-owner",
        ])
        .args([
            "--preserve-permissions",
            "--delay-directory-restore",
            "--no-overwrite-dir",
        ]);
    if let Some(f) = flag {
        cmd.arg(f);
    }
    // ACLs and SELinux labels travel either as plain xattr records
    // (SCHILY.xattr.*, from `tar --xattrs`) or as records of their own (from
    // `tar --acls` / `--selinux`). GNU tar ignores the xattr form of one when
    // asked for the other, so ask only for the forms the archive uses.
    let forms = special_forms(archive, flag)
        .with_context(|| format!("reading {}", archive.display()))
        .context(ExitKind::Source)?;
    if forms.acls {
        cmd.arg("--acls");
    }
    if forms.selinux {
        cmd.arg("--selinux");
    }
    crate::sys::cmd::run(&mut cmd)
        .with_context(|| format!("unpacking {}", archive.display()))
        .context(ExitKind::Source)?;
    Ok(())
}

/// Which dedicated pax record forms an archive uses.
#[derive(Default, Debug)]
struct SpecialForms {
    acls: bool,
    selinux: bool,
}

fn special_forms(archive: &Path, flag: Option<&str>) -> Result<SpecialForms> {
    let f = std::io::BufReader::new(std::fs::File::open(archive)?);
    let r: Box<dyn std::io::Read> = match flag {
        Some("--gzip") => Box::new(flate2::read::MultiGzDecoder::new(f)),
        Some("--zstd") => Box::new(zstd::stream::read::Decoder::with_buffer(f)?),
        _ => Box::new(f),
    };
    let mut forms = SpecialForms::default();
    let mut ar = tar::Archive::new(r);
    for entry in ar.entries()? {
        let mut entry = entry?;
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let key = ext?.key_bytes().to_vec();
                forms.acls |= key.starts_with(b"SCHILY.acl.");
                forms.selinux |= key.starts_with(b"RHT.security.selinux");
            }
        }
        if forms.acls && forms.selinux {
            break;
        }
    }
    Ok(forms)
}
