//! `imageupd provision`: make a bare node's disks a bootable node of a
//! published image, in one command, commit last.
//!
//! The steps, in order ([`run`]): read and check every input (scheme,
//! configdrive, disks, the image's signed manifest) and compile the plan,
//! touching no disk; then wipe the ends of the disks and write the
//! marker, make the filesystems, apply the image onto the empty root with
//! the update engine (every object verified, resumable), write
//! `/etc/fstab`, install the bootloader, write the configdrive, and only
//! then the partition tables and the marker "done". A run killed at any
//! point leaves disks without a partition table (they do not boot) and a
//! marker; the next run with the same inputs continues from the last
//! completed step, or says "nothing to do".
//!
//! `--whole-disk` instead writes the published whole-disk image the signed
//! manifest records, first MiB last ([`whole`]).

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::apply::{ApplyOptions, ApplyReport};
use crate::engine::config::KernelPolicy;
use crate::format::manifest::RelPath;
use crate::fs::fsx;
use crate::sys::error::ExitKind;
use crate::sys::progress::Progress;

pub mod boot;
pub mod configdrive;
pub mod disk;
pub mod fstab;
pub mod media;
pub mod mkfs;
pub mod plan;
pub mod scheme;
pub mod state;
pub mod table;
pub mod trust;
pub mod whole;

use disk::{Disk, Loop};
use plan::{PartPlan, Plan};
use scheme::{Firmware, Role};
use state::{Marker, Step};

/// Where the trusted keys of the ramdisk running `provision` are, copied
/// into the new root so that it trusts the same publishers.
pub const DEFAULT_KEYS_DIR: &str = "/etc/imageupd/trusted.d";
/// The root of trust of the ramdisk running `provision`, used when
/// `--root-of-trust` is not given and the file exists.
pub const DEFAULT_ROOT_OF_TRUST: &str = "/etc/imageupd/root.json";
/// Host directory under which a run mounts the new root (per boot disk),
/// so that a re-run finds and unmounts what a killed run left.
pub const RUN_DIR: &str = "/run/imageupd/provision";

/// What the operator asked for.
#[derive(Clone, Debug, Default)]
pub struct ProvisionOptions {
    /// Store directory or URL.
    pub from: String,
    /// Image id.
    pub id: String,
    /// Scheme text.
    pub scheme: String,
    /// `--disk` values: `PATH` (in scheme order) or `NAME=PATH`.
    pub disks: Vec<String>,
    /// Configdrive inputs text.
    pub configdrive: Option<String>,
    /// Trusted keys directory (default [`DEFAULT_KEYS_DIR`]).
    pub keys_dir: PathBuf,
    /// Root of trust (`root.json`); `None`: [`DEFAULT_ROOT_OF_TRUST`] if
    /// present.
    pub root_of_trust: Option<PathBuf>,
    /// Accept an unsigned image.
    pub allow_unsigned: bool,
    /// Extra CA for an https source.
    pub ca_file: Option<PathBuf>,
    /// Plan only.
    pub dry_run: bool,
    /// Progress as JSON lines.
    pub json: bool,
}

/// The outcome, printed with `--json` and POSTed with `--report-url`.
#[derive(Debug, Serialize)]
pub struct ProvisionReport {
    /// "planned", "provisioned" or "nothing-to-do".
    pub result: String,
    /// Image id.
    pub image: String,
    /// Key id that signed its manifest.
    pub signed_by: Option<String>,
    /// The step a re-run continued after (none for a fresh run).
    pub resumed_after: Option<Step>,
    /// The plan (offsets, UUIDs).
    pub plan: Plan,
    /// Digest of the plan (the marker's).
    pub plan_digest: String,
    /// The apply onto the root.
    pub apply: Option<ApplyReport>,
    /// Milliseconds per step.
    pub phases: BTreeMap<String, u64>,
}

/// Everything checked before a disk is touched.
struct Job {
    plan: Plan,
    disks: Vec<Disk>,
    drive: Option<configdrive::Files>,
    keys: Vec<(String, Vec<u8>)>,
    /// The root of trust's bytes, installed as the new root's anchor.
    anchor: Option<Vec<u8>>,
    cmdline: String,
    inputs: String,
    signed_by: Option<String>,
}

/// Run `imageupd provision`.
pub fn run(opts: &ProvisionOptions, progress: &Progress) -> Result<ProvisionReport> {
    let job = prepare(opts)?;
    let mut report = ProvisionReport {
        result: "planned".into(),
        image: opts.id.clone(),
        signed_by: job.signed_by.clone(),
        resumed_after: None,
        plan_digest: job.plan.digest(),
        plan: job.plan.clone(),
        apply: None,
        phases: BTreeMap::new(),
    };
    if opts.dry_run {
        return Ok(report);
    }
    let boot = boot_index(&job);
    let run_dir =
        Path::new(RUN_DIR).join(&digest(job.disks[boot].path.to_string_lossy().as_bytes())[..16]);
    disk::umount_below(&run_dir)?;
    for d in &job.disks {
        disk::detach_stale(d)?;
    }
    let found = job.disks[boot].read_marker()?;
    let mut step = Marker::resume_from(found.as_ref(), &report.plan_digest, &job.inputs);
    if step == Step::Done {
        progress.line(&format!(
            "nothing to do: {} already holds image {} by this plan",
            job.disks[boot].path.display(),
            opts.id
        ));
        report.result = "nothing-to-do".into();
        return Ok(report);
    }
    if step != Step::Fresh {
        progress.line(&format!(
            "an earlier run stopped after step {step:?}; continuing"
        ));
        report.resumed_after = Some(step);
    }
    let mut w = Work {
        opts,
        job: &job,
        boot,
        run_dir,
        root: None,
        progress,
    };
    let res = w.steps(&mut step, &mut report);
    let closed = w.close();
    res?;
    closed?;
    report.result = "provisioned".into();
    Ok(report)
}

/// The configdrive's files from `--configdrive`, checked (cloud-init's
/// rules) before any disk is touched; `None` without one.
fn configdrive_files(opts: &ProvisionOptions) -> Result<Option<configdrive::Files>> {
    opts.configdrive
        .as_deref()
        .map(|t| configdrive::parse(t).and_then(|i| configdrive::build(&i)))
        .transpose()
        .context(ExitKind::Usage)
}

/// Read and check all inputs and compile the plan; no disk is written.
fn prepare(opts: &ProvisionOptions) -> Result<Job> {
    let sch = scheme::parse(&opts.scheme).context(ExitKind::Usage)?;
    let drive = configdrive_files(opts)?;
    let has_cd = sch
        .disks
        .iter()
        .flat_map(|d| &d.partitions)
        .any(|p| p.role == Role::Configdrive);
    match (has_cd, drive.is_some()) {
        (true, false) => {
            return Err(anyhow!(
                "the scheme has a configdrive partition: pass --configdrive FILE"
            ))
            .context(ExitKind::Usage)
        }
        (false, true) => {
            return Err(anyhow!(
                "--configdrive given but the scheme has no configdrive partition"
            ))
            .context(ExitKind::Usage)
        }
        _ => {}
    }
    let disks = map_disks(&sch, &opts.disks)?;
    let invs: Vec<_> = disks.iter().map(|d| d.inv.clone()).collect();
    let seed = sch
        .seed
        .clone()
        .unwrap_or_else(|| format!("{}\0{}", opts.id, opts.disks.join("\0")));
    let plan = plan::compile(&sch, &invs, &seed).context(ExitKind::Usage)?;
    let keys = trust::read_keys(&opts.keys_dir)?;
    let anchor = trust::read_anchor(opts.root_of_trust.as_deref())?;
    let signed_by = trust::check_image(opts, anchor.as_deref())?;
    let cmdline = sch
        .cmdline
        .clone()
        .unwrap_or_else(|| boot::DEFAULT_CMDLINE.into());
    let mut h = Sha256::new();
    for part in [opts.id.as_bytes(), cmdline.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for (n, b) in drive.iter().flatten().chain(keys.iter()) {
        h.update(n.as_bytes());
        h.update(Sha256::digest(b));
    }
    if let Some(a) = &anchor {
        h.update(b"root.json");
        h.update(Sha256::digest(a));
    }
    Ok(Job {
        plan,
        disks,
        drive,
        keys,
        anchor,
        cmdline,
        inputs: hex::encode(h.finalize()),
        signed_by,
    })
}

/// `--disk` values to disks in scheme order.
fn map_disks(sch: &scheme::Scheme, given: &[String]) -> Result<Vec<Disk>> {
    let named: Vec<(Option<&str>, &str)> = given
        .iter()
        .map(|g| match g.split_once('=') {
            Some((n, p)) if !n.contains('/') => (Some(n), p),
            _ => (None, g.as_str()),
        })
        .collect();
    if named.len() != sch.disks.len() {
        return Err(plan::PlanError::DiskCount {
            scheme: sch.disks.len(),
            given: named.len(),
        })
        .context(ExitKind::Usage);
    }
    let by_name = named.iter().all(|(n, _)| n.is_some());
    sch.disks
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let path = if by_name {
                named
                    .iter()
                    .find(|(n, _)| *n == Some(spec.name.as_str()))
                    .map(|(_, p)| *p)
                    .ok_or_else(|| {
                        anyhow!(
                            "no --disk {}=PATH for the scheme's disk {:?}",
                            spec.name,
                            spec.name
                        )
                    })
                    .context(ExitKind::Usage)?
            } else {
                named[i].1
            };
            disk::inspect(Path::new(path))
        })
        .collect()
}

fn boot_index(job: &Job) -> usize {
    job.plan.disks.iter().position(|d| d.boot).unwrap_or(0)
}

fn digest(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A run in progress: the job, the root's mount while it is needed.
struct Work<'a> {
    opts: &'a ProvisionOptions,
    job: &'a Job,
    boot: usize,
    run_dir: PathBuf,
    root: Option<(Loop, PathBuf)>,
    progress: &'a Progress,
}

impl Work<'_> {
    /// Every pending step, in order; the marker after each.
    fn steps(&mut self, step: &mut Step, report: &mut ProvisionReport) -> Result<()> {
        while let Some(next) = step.next() {
            let t = Instant::now();
            self.say(next);
            match next {
                Step::Fresh => {}
                Step::Wiped => self.wipe()?,
                Step::Formatted => self.format()?,
                Step::Applied => report.apply = Some(self.apply()?),
                Step::Fstab => self.fstab()?,
                Step::Bootloader => self.bootloader()?,
                Step::Configdrive => self.configdrive()?,
                Step::Table => self.tables()?,
                Step::Done => {}
            }
            *step = step.advance(next)?;
            crate::sys::fault::point(fault_name(next));
            self.job.disks[self.boot].write_marker(&Marker {
                step: *step,
                plan: report.plan_digest.clone(),
                inputs: self.job.inputs.clone(),
            })?;
            report.phases.insert(
                format!("{next:?}").to_lowercase(),
                t.elapsed().as_millis() as u64,
            );
        }
        Ok(())
    }

    fn say(&self, s: Step) {
        if self.opts.json {
            eprintln!(
                "{}",
                serde_json::json!({"step": s, "disk": self.job.disks[self.boot].path})
            );
        } else {
            self.progress.line(&format!("provision: {}", describe(s)));
        }
    }

    /// The partitions of a role on every disk, with their disk.
    fn parts(&self, roles: &[Role]) -> Vec<(&Disk, &PartPlan)> {
        self.job
            .disks
            .iter()
            .zip(&self.job.plan.disks)
            .flat_map(|(d, p)| p.partitions.iter().map(move |x| (d, x)))
            .filter(|(_, p)| roles.contains(&p.role))
            .collect()
    }

    fn wipe(&self) -> Result<()> {
        for d in &self.job.disks {
            d.zero_ends()?;
        }
        Ok(())
    }

    fn format(&self) -> Result<()> {
        for (d, p) in self.parts(&[Role::Root, Role::Data, Role::Swap]) {
            let l = Loop::attach(d, p.start_bytes, p.size_bytes)?;
            mkfs::make(&l.dev, p)?;
        }
        Ok(())
    }

    /// The root, mounted (once) under the run directory.
    fn root(&mut self) -> Result<PathBuf> {
        if let Some((_, m)) = &self.root {
            return Ok(m.clone());
        }
        let (d, p) = self.parts(&[Role::Root])[0];
        let l = Loop::attach(d, p.start_bytes, p.size_bytes)?;
        let fs = p.fs.map(mkfs::fstype).unwrap_or("ext4");
        let at = self.run_dir.join("root");
        disk::mount(&l.dev, fs, &at)?;
        self.root = Some((l, at.clone()));
        Ok(at)
    }

    fn apply(&mut self) -> Result<ApplyReport> {
        let root = self.root()?;
        let rf = crate::fs::rootfs::RootFs::open(&root)?;
        let dir =
            fsx::ensure_dir_beneath(rf.fd(), &RelPath(b"etc/imageupd/trusted.d".to_vec()), 0o755)
                .context("creating etc/imageupd/trusted.d on the new root")?;
        for (name, bytes) in &self.job.keys {
            fsx::write_atomic(dir.as_fd(), name.as_bytes(), bytes, 0o644)
                .with_context(|| format!("installing trusted key {name}"))?;
        }
        if let Some(a) = &self.job.anchor {
            // The node's anchor: the apply below, and every later one,
            // verifies against it.
            let etc = fsx::ensure_dir_beneath(rf.fd(), &RelPath(b"etc/imageupd".to_vec()), 0o755)?;
            fsx::write_atomic(etc.as_fd(), b"root.json", a, 0o644)
                .context("installing the root of trust as etc/imageupd/root.json")?;
        }
        let o = ApplyOptions {
            root: root.clone(),
            from: Some(self.opts.from.clone()),
            id: Some(self.opts.id.clone()),
            allow_unsigned: self.opts.allow_unsigned,
            // The host's kernel is not the node's: record the new kernel,
            // never kexec the ramdisk into it.
            kernel_policy: Some(KernelPolicy::Defer),
            ca_file: self.opts.ca_file.clone(),
            ..Default::default()
        };
        let r = crate::apply::run(&o, &Progress::new(self.opts.json))?;
        fsx::syncfs(rf.fd()).context("syncing the new root")?;
        Ok(r)
    }

    fn fstab(&mut self) -> Result<()> {
        let root = self.root()?;
        let rf = crate::fs::rootfs::RootFs::open(&root)?;
        let etc = fsx::ensure_dir_beneath(rf.fd(), &RelPath(b"etc".to_vec()), 0o755)?;
        // etc/ keeps the image's mtime: fstab is a local file (preserved by
        // updates), not a change to the image's directory.
        let mtime = fsx::stat_fd(etc.as_fd())?.mtime_ns;
        fsx::write_atomic(
            etc.as_fd(),
            b"fstab",
            fstab::fstab(&self.job.plan).as_bytes(),
            0o644,
        )
        .context("writing etc/fstab")?;
        write_machine_id(&etc)?;
        fsx::set_mtime_fd(etc.as_fd(), mtime).context("keeping the mtime of etc/")?;
        if self.job.drive.is_some() {
            let (dir, name) = configdrive::PRESERVE_FRAGMENT
                .rsplit_once('/')
                .unwrap_or(("", configdrive::PRESERVE_FRAGMENT));
            let d = fsx::ensure_dir_beneath(rf.fd(), &RelPath(dir.as_bytes().to_vec()), 0o755)?;
            fsx::write_atomic(
                d.as_fd(),
                name.as_bytes(),
                configdrive::preserve_fragment().as_bytes(),
                0o644,
            )
            .with_context(|| format!("writing {}", configdrive::PRESERVE_FRAGMENT))?;
        }
        fsx::syncfs(rf.fd()).context("syncing the new root")
    }

    fn bootloader(&mut self) -> Result<()> {
        if self.job.plan.firmware == Firmware::Bios {
            self.progress.line(
                "provision: BIOS boot: no bootloader is installed by this version (UEFI only)",
            );
            return Ok(());
        }
        let root = self.root()?;
        let kernel = boot::find_kernel(&root)?;
        let (_, rp) = self.parts(&[Role::Root])[0];
        let cfg = boot::grub_cfg(
            rp.fs_uuid.as_deref().unwrap_or_default(),
            &kernel,
            &self.job.cmdline,
        );
        let tmp = tempfile::tempdir().context("temporary directory for the loader")?;
        let efi = tmp.path().join("BOOTX64.EFI");
        boot::build_loader(&cfg, &efi)?;
        let bytes = std::fs::read(&efi).with_context(|| format!("reading {}", efi.display()))?;
        for (d, p) in self.parts(&[Role::Esp]) {
            let l = Loop::attach(d, p.start_bytes, p.size_bytes)?;
            mkfs::make(&l.dev, p)?;
            media::write_files(&l.dev, &[(boot::REMOVABLE_PATH.to_string(), bytes.clone())])?;
        }
        Ok(())
    }

    fn configdrive(&self) -> Result<()> {
        let Some(files) = &self.job.drive else {
            return Ok(());
        };
        for (d, p) in self.parts(&[Role::Configdrive]) {
            let l = Loop::attach(d, p.start_bytes, p.size_bytes)?;
            mkfs::make(&l.dev, p)?;
            media::write_files(&l.dev, files)?;
        }
        Ok(())
    }

    /// The partition tables, last: the root is unmounted and synced first.
    fn tables(&mut self) -> Result<()> {
        self.close()?;
        for (d, p) in self.job.disks.iter().zip(&self.job.plan.disks) {
            table::write(d, p)?;
        }
        Ok(())
    }

    /// Unmount the root and detach its loop device; sync the disks.
    fn close(&mut self) -> Result<()> {
        if let Some((l, at)) = self.root.take() {
            disk::umount(&at)?;
            drop(l);
        }
        for d in &self.job.disks {
            d.sync()?;
        }
        Ok(())
    }
}

/// Give the node its identity now, as `systemd-machine-id-setup --root`
/// does at install time, when the image leaves `/etc/machine-id` empty,
/// missing or "uninitialized" (images must not share one). Else systemd's
/// first boot runs `preset-all` against a root still read-only (it fails,
/// after tens of seconds under emulation). `/etc/machine-id` is on the
/// update contract's preserve list: later updates keep it. A re-run keeps
/// the one already written.
fn write_machine_id(etc: &std::os::fd::OwnedFd) -> Result<()> {
    let have = match fsx::read_at_limited(etc.as_fd(), b"machine-id", 64) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).context("reading etc/machine-id"),
    };
    let t = String::from_utf8_lossy(&have);
    if !t.trim().is_empty() && t.trim() != "uninitialized" {
        return Ok(());
    }
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| anyhow!("no random bytes for a machine id: {e}"))?;
    // A version 4 UUID's bits (machine-id(5)).
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    fsx::write_atomic(
        etc.as_fd(),
        b"machine-id",
        format!("{}\n", hex::encode(b)).as_bytes(),
        0o444,
    )
    .context("writing etc/machine-id")
}

/// The fault point after a step (crash tests).
fn fault_name(s: Step) -> &'static str {
    match s {
        Step::Wiped => "provision-wiped",
        Step::Formatted => "provision-formatted",
        Step::Applied => "provision-applied",
        Step::Fstab => "provision-fstab",
        Step::Bootloader => "provision-bootloader",
        Step::Configdrive => "provision-configdrive",
        Step::Table => "provision-table",
        Step::Fresh | Step::Done => "provision-done",
    }
}

/// A step for progress lines.
fn describe(s: Step) -> &'static str {
    match s {
        Step::Fresh => "start",
        Step::Wiped => "wiping the old partition tables (first and last MiB)",
        Step::Formatted => "making the filesystems",
        Step::Applied => "applying the image onto the new root",
        Step::Fstab => "writing /etc/fstab (and the cloud-init preserve fragment)",
        Step::Bootloader => "installing the UEFI loader on the ESP",
        Step::Configdrive => "writing the configdrive",
        Step::Table => "writing the partition tables",
        Step::Done => "done",
    }
}
