//! `imageupd provision --whole-disk`: write the whole-disk image an image
//! was published from (`disks/<id>/<file>`, recorded with its size and
//! sha256 in the signed manifest) onto one disk, first MiB last.
//!
//! The manifest is fetched and verified exactly as for the tree path
//! ([`super::trust::verified_manifest`]: trusted keys or the root of trust,
//! the store's signed index); then, before any byte is written, the disk
//! must be at least the image's size and the image raw. The write:
//!
//! 1. the disk's first and last MiB are zeroed and synced (no old table or
//!    boot sector remains to boot from while the rest is written);
//! 2. the image is streamed `source → VerifyReader → HeadLast<disk>`: the
//!    first MiB is held in memory ([`HeadLast`]), every later byte goes to
//!    its offset on the disk as it arrives;
//! 3. at the end of the stream the digest and length are compared with the
//!    signed manifest's; on a mismatch the run stops there, the first MiB
//!    still zero (the disk does not boot);
//! 4. with `--configdrive`, a `config-2` partition is added at the end of
//!    the disk ([`drive`]: its filesystem and the moved backup GPT written
//!    and synced, the held first MiB replaced by one with the new entry);
//! 5. the disk is synced, then the first MiB is written and synced.
//!
//! A run killed anywhere before step 5 leaves a disk whose first MiB is
//! zero; the next run starts over and converges. A qcow2 artifact is
//! refused: its clusters are not stored in disk order, so it cannot be
//! converted in one ordered pass and checked as it streams.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use super::disk::{self, Disk};
use super::plan::MIB;
use super::{configdrive, trust, ProvisionOptions};
use crate::format::manifest::{DiskArtifact, DiskFormat};
use crate::format::stream::VerifyReader;
use crate::fs::sparse::fill;
use crate::net::fetch::DownloadReport;
use crate::sys::error::ExitKind;
use crate::sys::progress::Progress;

mod drive;

/// Bytes at the start of the image held in memory and written last (the
/// MBR, the primary GPT and the boot sectors all lie below it).
pub const HEAD_BYTES: usize = MIB as usize;
/// Bytes read and written per step of the stream (one fault-point pass).
const CHUNK: usize = MIB as usize;
/// The fault point passed after every chunk written (crash tests).
pub const FAULT_MID_STREAM: &str = "whole-disk-stream";

/// The outcome of `provision --whole-disk`.
#[derive(Debug, Serialize)]
pub struct WholeDiskReport {
    /// "planned" (`--dry-run`) or "provisioned".
    pub result: String,
    /// Image id.
    pub image: String,
    /// Key id that signed its manifest.
    pub signed_by: Option<String>,
    /// The target disk (canonical path).
    pub disk: String,
    /// Its size in bytes.
    pub disk_bytes: u64,
    /// The signed record of the image written.
    pub whole_disk: DiskArtifact,
    /// The config-2 partition added at the end of the disk (`--configdrive`).
    pub configdrive: Option<crate::provision::plan::PartPlan>,
    /// The network side (HTTP sources only).
    pub download: Option<DownloadReport>,
    /// Milliseconds per step.
    pub phases: BTreeMap<String, u64>,
}

/// Run `imageupd provision --whole-disk`.
pub fn run(opts: &ProvisionOptions, progress: &Progress) -> Result<WholeDiskReport> {
    let job = prepare(opts)?;
    let (target, art) = (&job.target, &job.art);
    let mut report = WholeDiskReport {
        result: "planned".into(),
        image: opts.id.clone(),
        signed_by: job.signed_by.clone(),
        disk: target.path.display().to_string(),
        disk_bytes: target.inv.size_bytes,
        whole_disk: art.clone(),
        configdrive: None,
        download: None,
        phases: BTreeMap::new(),
    };
    if opts.dry_run {
        return Ok(report);
    }
    let say = |step: &str, what: &str| {
        if opts.json {
            eprintln!("{}", serde_json::json!({"step": step, "disk": target.path}));
        } else {
            progress.line(&format!("provision: {what}"));
        }
    };
    let mut t = Instant::now();
    let mut phase = |name: &str, report: &mut WholeDiskReport| {
        report
            .phases
            .insert(name.into(), t.elapsed().as_millis() as u64);
        t = Instant::now();
    };
    let mut w = Writer::open(job.source.open_disk(&opts.id, art)?, target, art, progress)?;
    // The head first, held: what the configdrive needs of it is checked
    // before the disk is touched.
    w.chunk()?;
    if job.drive.is_some() {
        drive::check_head(w.out.head(), target.inv.sector_size)
            .map_err(anyhow::Error::msg)
            .context(ExitKind::Usage)?;
    }
    say(
        "wiped",
        "wiping the old partition tables (first and last MiB)",
    );
    target.zero_ends()?;
    phase("wiped", &mut report);
    say(
        "streamed",
        &format!(
            "writing {} ({}) from MiB 1 on, its digest checked in-stream",
            art.file,
            crate::sys::progress::human_bytes(art.size)
        ),
    );
    let mut held = w.rest()?;
    phase("streamed", &mut report);
    if let Some(files) = &job.drive {
        say(
            "configdrive",
            "adding the configdrive at the end of the disk",
        );
        let (head, part) = drive::add(target, held.head(), art.size, files, &job.seed)?;
        held.replace_head(head);
        report.configdrive = Some(part);
        phase("configdrive", &mut report);
    }
    say("committed", "digest matched: writing the first MiB");
    held.commit()
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing the first MiB of {}", target.path.display()))?;
    if target.block {
        reread_table(&target.path);
    }
    phase("committed", &mut report);
    say("done", "done");
    report.download = job.source.download_report();
    report.result = "provisioned".into();
    Ok(report)
}

/// Everything checked before the disk is touched.
struct Job {
    target: Disk,
    art: DiskArtifact,
    source: crate::net::source::Source,
    signed_by: Option<String>,
    /// The configdrive's files, with `--configdrive`.
    drive: Option<configdrive::Files>,
    /// Seed of the configdrive's UUIDs: image id and disk.
    seed: String,
}

/// Every check, before the disk is touched: one disk, the configdrive
/// inputs, the image's signed manifest and its disk record, a raw image
/// no larger than the disk (with room for the configdrive).
fn prepare(opts: &ProvisionOptions) -> Result<Job> {
    let drive = super::configdrive_files(opts)?;
    let [given] = opts.disks.as_slice() else {
        return Err(anyhow!(
            "--whole-disk writes one disk: give exactly one --disk (got {})",
            opts.disks.len()
        ))
        .context(ExitKind::Usage);
    };
    let path = given.split_once('=').map_or(given.as_str(), |(_, p)| p);
    let target = disk::inspect(Path::new(path))?;
    let anchor = trust::read_anchor(opts.root_of_trust.as_deref())?;
    let (source, resolved) = trust::verified_manifest(opts, anchor.as_deref())?;
    let art = resolved.manifest.disk.clone().ok_or_else(|| {
        anyhow!(
            "image {:?} was not published from a disk image: its signed manifest records no whole-disk image (provision it with --scheme)",
            opts.id
        )
    }).context(ExitKind::Source)?;
    if art.format != DiskFormat::Raw {
        return Err(anyhow!(
            "image {:?}'s disk image {} is {}: --whole-disk streams raw images only (a qcow2's clusters are not in disk order, so it cannot be converted and checked in one ordered pass); publish the .raw",
            opts.id,
            art.file,
            art.format.as_str()
        ))
        .context(ExitKind::Usage);
    }
    if target.inv.size_bytes < art.size {
        return Err(anyhow!(
            "disk {} has {} bytes, image {:?}'s disk image {} needs {}; nothing was written",
            target.path.display(),
            target.inv.size_bytes,
            opts.id,
            art.file,
            art.size
        ))
        .context(ExitKind::Preflight);
    }
    if drive.is_some() {
        drive::span(target.inv.size_bytes, target.inv.sector_size, art.size)
            .map_err(|e| anyhow!("{e}; nothing was written"))
            .context(ExitKind::Preflight)?;
    }
    let seed = format!("{}\0{}", opts.id, target.path.display());
    Ok(Job {
        target,
        art,
        source,
        signed_by: resolved.signed_by,
        drive,
        seed,
    })
}

/// The stream on its way to the disk: `source → VerifyReader → HeadLast`.
struct Writer<'a, 'r> {
    src: VerifyReader<Box<dyn Read + Send + 'r>>,
    out: HeadLast<std::fs::File>,
    target: &'a Disk,
    art: &'a DiskArtifact,
    bar: crate::sys::progress::Bar,
    buf: Vec<u8>,
}

impl<'a, 'r> Writer<'a, 'r> {
    fn open(
        reader: Box<dyn Read + Send + 'r>,
        target: &'a Disk,
        art: &'a DiskArtifact,
        progress: &Progress,
    ) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&target.path)
            .with_context(|| format!("opening disk {} for writing", target.path.display()))?;
        Ok(Writer {
            src: VerifyReader::new(reader),
            out: HeadLast::new(f, HEAD_BYTES),
            target,
            art,
            bar: progress.bar("writing", art.size),
            buf: vec![0u8; CHUNK],
        })
    }

    /// One chunk from the stream to the writer; false at the end.
    fn chunk(&mut self) -> Result<bool> {
        let n = fill(&mut self.src, &mut self.buf)
            .with_context(|| format!("reading the disk image {}", self.art.file))
            .context(ExitKind::Source)?;
        if n == 0 {
            return Ok(false);
        }
        self.out
            .write_all(&self.buf[..n])
            .with_context(|| format!("writing to {}", self.target.path.display()))?;
        self.bar.inc(n as u64);
        crate::sys::fault::point(FAULT_MID_STREAM);
        Ok(true)
    }

    /// The rest of the stream; then the digest and length checked against
    /// the signed record and the disk synced. Returns the writer with the
    /// first MiB still held.
    fn rest(mut self) -> Result<HeadLast<std::fs::File>> {
        while self.chunk()? {}
        self.bar.finish();
        let (art, target) = (self.art, self.target);
        self.src
            .finish(&art.sha256, art.size)?
            .map_err(|e| {
                anyhow!(e).context(format!(
                    "the disk image {} is not what the signed manifest says; its first MiB was not written, {} does not boot",
                    art.file,
                    target.path.display()
                ))
            })
            .context(ExitKind::Untrusted)?;
        self.out.flush()?;
        self.out
            .get_ref()
            .sync_all()
            .with_context(|| format!("syncing {}", target.path.display()))?;
        Ok(self.out)
    }
}

/// Tell the kernel about the new partition table (best effort: a disk
/// image file has none to reread, a busy disk is reread at the next boot).
fn reread_table(dev: &Path) {
    if let Err(e) = crate::sys::cmd::run(
        std::process::Command::new("blockdev")
            .arg("--rereadpt")
            .arg(dev),
    ) {
        tracing::warn!("blockdev --rereadpt {}: {e:#}", dev.display());
    }
}

/// A writer that holds the first `head_len` bytes written to it in memory
/// and passes every later byte to `inner` at its offset; [`HeadLast::commit`]
/// writes the held bytes at offset 0, last. Dropped without a commit, the
/// start of `inner` is never written.
pub struct HeadLast<W> {
    inner: W,
    head: Vec<u8>,
    head_len: usize,
    /// Bytes accepted so far (held or passed on).
    pos: u64,
    /// `inner` is positioned at `head_len` (done once, at the first byte
    /// past the head).
    placed: bool,
}

impl<W: Write + Seek> HeadLast<W> {
    /// Hold the first `head_len` bytes written.
    pub fn new(inner: W, head_len: usize) -> Self {
        HeadLast {
            inner,
            head: Vec::with_capacity(head_len),
            head_len,
            pos: 0,
            placed: false,
        }
    }

    /// The bytes held so far.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Bytes accepted so far.
    pub fn written(&self) -> u64 {
        self.pos
    }

    /// The inner writer (to sync it before the commit).
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Hold `head` instead of the bytes held so far (an edited table);
    /// the same length, so nothing past the head moves.
    pub fn replace_head(&mut self, head: Vec<u8>) {
        debug_assert_eq!(head.len(), self.head.len());
        self.head = head;
    }

    /// Write the held bytes at offset 0 and return the inner writer.
    pub fn commit(mut self) -> io::Result<W> {
        self.inner.flush()?;
        self.inner.seek(SeekFrom::Start(0))?;
        self.inner.write_all(&self.head)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write + Seek> Write for HeadLast<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.head.len() < self.head_len {
            let take = buf.len().min(self.head_len - self.head.len());
            self.head.extend_from_slice(&buf[..take]);
            self.pos += take as u64;
            return Ok(take);
        }
        if !self.placed {
            self.inner.seek(SeekFrom::Start(self.head_len as u64))?;
            self.placed = true;
        }
        let n = self.inner.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn head_is_held_until_commit_and_the_rest_lands_in_place() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut w = HeadLast::new(Cursor::new(vec![0u8; 12_000]), 4096);
        // Odd-sized writes straddling the head's end.
        for c in data.chunks(777) {
            w.write_all(c).unwrap();
        }
        assert_eq!(w.written(), 10_000);
        assert_eq!(w.head(), &data[..4096]);
        let inner = w.get_ref().get_ref();
        assert!(inner[..4096].iter().all(|&b| b == 0), "head written early");
        assert_eq!(&inner[4096..10_000], &data[4096..]);
        assert!(inner[10_000..].iter().all(|&b| b == 0));
        let out = w.commit().unwrap().into_inner();
        assert_eq!(&out[..10_000], &data[..]);
    }

    #[test]
    fn dropped_without_commit_the_start_stays_untouched_and_small_images_work() {
        let mut w = HeadLast::new(Cursor::new(vec![7u8; 100]), 4096);
        w.write_all(&[1u8; 50]).unwrap();
        assert_eq!(w.get_ref().get_ref(), &vec![7u8; 100]);
        // An image smaller than the head: everything is written at commit.
        let out = w.commit().unwrap().into_inner();
        assert_eq!(&out[..50], &[1u8; 50]);
        assert_eq!(&out[50..], &[7u8; 50]);
    }

    #[test]
    fn fill_reads_across_short_reads() {
        struct Short<'a>(&'a [u8]);
        impl Read for Short<'_> {
            fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
                let n = b.len().min(3).min(self.0.len());
                b[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut r = Short(b"abcdefghij");
        let mut buf = [0u8; 8];
        assert_eq!(fill(&mut r, &mut buf).unwrap(), 8);
        assert_eq!(&buf, b"abcdefgh");
        assert_eq!(fill(&mut r, &mut buf).unwrap(), 2);
        assert_eq!(fill(&mut r, &mut buf).unwrap(), 0);
    }
}
