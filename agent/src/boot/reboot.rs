//! Acting on a kernel change (SPEC §8), and finishing it after the boot.
//!
//! After an apply that changed the kernel, [`after_apply`] records the
//! change in the state directory (`var/lib/imageupd/kernel.json`, so it
//! survives the reboot), runs the `pre-reboot.d` hooks and acts on the
//! kernel policy:
//!
//! - `kexec`: load the target's vmlinuz and initrd (paths and digests from
//!   the target manifest, read inside the updated root) with the running
//!   kernel's command line, then start `kexec.target` over D-Bus; when the
//!   load or the start fails, reboot instead;
//! - `reboot`: reboot through logind (or systemd) over D-Bus;
//! - `defer`: only record that a reboot is required; `imageupd reboot`
//!   acts on it later.
//!
//! Only the running system's root is ever acted on; for any other root the
//! change is recorded and nothing else happens, unless an [`Actuator`] says
//! otherwise (tests, with a private bus and a fake loader).
//!
//! After the boot, [`confirm_boot`] (run by `imageupd boot-check` and by
//! the agent at start) compares `uname -r` with the recorded target
//! release, records the update complete or failed with the reason, and
//! removes module directories that neither the current image nor the
//! running kernel needs: the apply kept the old kernel's modules while that
//! kernel ran.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::boot::dbus::{self, Bus};
use crate::boot::kexec_sys;
use crate::engine::config::{policy_word, Config, KernelPolicy};
use crate::engine::hooks::{HookEnv, HookPhase, HookRunner};
use crate::engine::lock::Lock;
use crate::engine::remount;
use crate::engine::report::ApplyReport;
use crate::format::manifest::{Digest, FileType, KernelInfo, RelPath};
use crate::fs::fsx;
use crate::fs::preserve::Preserve;
use crate::fs::rootfs::{self, RootFs};
use crate::sys::progress::Progress;

/// File name of the kernel record, in the state directory.
pub const RECORD_NAME: &[u8] = b"kernel.json";
/// The running kernel's command line, reused for kexec.
pub const PROC_CMDLINE: &str = "/proc/cmdline";
/// This boot's id.
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// Directories (relative to the root) that hold one module directory per
/// kernel release.
pub const MODULE_DIRS: [&str; 2] = ["usr/lib/modules", "lib/modules"];

/// Where a kernel change stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelState {
    /// The root is updated; the node must still boot the target kernel.
    Pending,
    /// The node runs the target kernel: the update is complete.
    Complete,
    /// The node booted again, but not into the target kernel.
    Failed,
    /// A later update made the root's kernel the running one again.
    Superseded,
}

/// What was done about a pending change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Policy `defer` (or a pre-reboot hook failed): the operator acts.
    Deferred,
    /// Not the running system's root: nothing to boot.
    NotHostRoot,
    /// The target kernel was loaded and `kexec.target` started.
    Kexec,
    /// A reboot was requested.
    Reboot,
    /// Neither kexec nor reboot could be requested (see `action_error`).
    Failed,
}

impl Action {
    /// The word used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deferred => "deferred",
            Action::NotHostRoot => "not-host-root",
            Action::Kexec => "kexec",
            Action::Reboot => "reboot",
            Action::Failed => "failed",
        }
    }
}

/// The record of the last kernel change of a root (`kernel.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRecord {
    /// Image whose kernel the node must boot.
    pub image_id: String,
    /// Image the root had before that update.
    pub from_image: Option<String>,
    /// The target kernel, as the image's manifest records it.
    pub target: KernelInfo,
    /// Kernel running when the change was recorded.
    pub from_release: Option<String>,
    /// Why the kernel counts as changed.
    pub reason: String,
    /// Policy in force.
    pub policy: KernelPolicy,
    /// Where the change stands.
    pub state: KernelState,
    /// What was done about it.
    pub action: Action,
    /// Why the policy's first choice did not happen (e.g. a kexec load
    /// that failed before the fallback reboot).
    pub action_error: Option<String>,
    /// When the change was recorded (RFC 3339).
    pub recorded: String,
    /// The boot that recorded it (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: Option<String>,
    /// When kexec or the reboot was requested, Unix epoch ms.
    pub requested_ms: Option<u64>,
    /// Kernel found running when the boot was checked.
    pub booted_release: Option<String>,
    /// When the boot was checked (RFC 3339).
    pub confirmed: Option<String>,
    /// From the request to the boot check, ms (both clocks are the node's).
    pub request_to_confirm_ms: Option<u64>,
    /// Why the change failed.
    pub error: Option<String>,
}

impl KernelRecord {
    /// One line for `status`.
    pub fn describe(&self) -> String {
        let t = &self.target.release;
        match self.state {
            KernelState::Pending => format!(
                "reboot required into {t} for image {} ({}); {}",
                self.image_id,
                self.reason,
                match self.action {
                    Action::Deferred => "deferred: run `imageupd reboot`".to_string(),
                    Action::NotHostRoot => "not the running system's root".to_string(),
                    Action::Kexec => "kexec requested".to_string(),
                    Action::Reboot => "reboot requested".to_string(),
                    Action::Failed => format!(
                        "the reboot could not be requested: {}",
                        self.action_error.as_deref().unwrap_or("")
                    ),
                }
            ),
            KernelState::Complete => format!(
                "image {} runs its kernel {t} (complete {})",
                self.image_id,
                self.confirmed.as_deref().unwrap_or("")
            ),
            KernelState::Failed => format!(
                "update to image {} failed: {}",
                self.image_id,
                self.error.as_deref().unwrap_or("")
            ),
            KernelState::Superseded => format!(
                "change to {t} for image {} superseded: the root's kernel is the running one again",
                self.image_id
            ),
        }
    }
}

/// Read the kernel record of `root`, if any.
pub fn load(root: &RootFs) -> Result<Option<KernelRecord>> {
    let Some(state) = root.state_dir()? else {
        return Ok(None);
    };
    match fsx::read_beneath(state.as_fd(), &RelPath(RECORD_NAME.to_vec())) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "parsing {}/{}/kernel.json",
                root.path.display(),
                rootfs::STATE_DIR
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!(
                "reading {}/{}/kernel.json",
                root.path.display(),
                rootfs::STATE_DIR
            )
        }),
    }
}

/// Run `f` with the root's filesystem writable: a read-only mount is
/// remounted read-write, synced and remounted read-only afterwards.
fn with_writable<T>(root: &RootFs, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let mount = remount::find(&root.path)?;
    let remounted = match &mount {
        Some(m) if m.read_only() => {
            remount::remount(&m.mount_point, true)
                .context("the root is read-only and could not be made writable")?;
            Some(m.mount_point.clone())
        }
        _ => None,
    };
    let res = f();
    let synced = fsx::syncfs(root.fd()).context("syncfs of the root");
    if let Some(mp) = remounted {
        if let Err(e) = remount::remount(&mp, false) {
            tracing::warn!("{e:#}");
        }
    }
    let v = res?;
    synced?;
    Ok(v)
}

/// Write the record atomically into the state directory.
pub fn save(root: &RootFs, rec: &KernelRecord) -> Result<()> {
    let json = serde_json::to_vec_pretty(rec)?;
    with_writable(root, || {
        let state = root.ensure_state_dir()?;
        fsx::write_atomic(state.as_fd(), RECORD_NAME, &json, 0o644)
            .context("writing the kernel record (var/lib/imageupd/kernel.json)")
    })
}

/// The kernel and initrd to kexec, opened and checked against the manifest.
pub struct KexecImage {
    /// Path of the kernel image inside the root.
    pub kernel_path: RelPath,
    /// The kernel image.
    pub kernel: File,
    /// Path of the initrd inside the root.
    pub initrd_path: Option<RelPath>,
    /// The initrd.
    pub initrd: Option<File>,
    /// Command line for the new kernel.
    pub cmdline: CString,
}

/// Loads a [`KexecImage`] into the kernel, and unloads it again.
pub trait KexecLoader: Send + Sync {
    /// Load the image as the kernel a kexec starts.
    fn load(&self, img: &KexecImage) -> Result<()>;
    /// Unload it (after `kexec.target` could not be started).
    fn unload(&self);
}

/// The real loader: `kexec_file_load(2)`.
pub struct SyscallLoader;

impl KexecLoader for SyscallLoader {
    fn load(&self, img: &KexecImage) -> Result<()> {
        kexec_sys::load(
            img.kernel.as_fd(),
            img.initrd.as_ref().map(|f| f.as_fd()),
            &img.cmdline,
        )
        .map_err(|e| {
            anyhow!(
                "kexec_file_load of {} (initrd {}) with command line {:?} failed: {e}",
                img.kernel_path,
                img.initrd_path
                    .as_ref()
                    .map_or("none".to_string(), |p| p.to_string()),
                img.cmdline
            )
        })
    }

    fn unload(&self) {
        if let Err(e) = kexec_sys::unload() {
            tracing::warn!("unloading the kexec kernel: {e}");
        }
    }
}

/// How a kernel change is acted on: the bus, the kexec loader, and whether
/// roots other than `/` may be acted on.
pub struct Actuator {
    /// The bus systemd and logind are on.
    pub bus: Bus,
    /// Loads the kexec kernel.
    pub loader: Box<dyn KexecLoader>,
    /// Where the running kernel's command line is read.
    pub cmdline_path: PathBuf,
    /// Act on any root, not only the running system's (tests only).
    pub any_root: bool,
}

impl Actuator {
    /// The real thing: the system bus and `kexec_file_load(2)`, acting only
    /// on `/`.
    pub fn host() -> Actuator {
        Actuator {
            bus: Bus::System,
            loader: Box::new(SyscallLoader),
            cmdline_path: PathBuf::from(PROC_CMDLINE),
            any_root: false,
        }
    }
}

/// Open `rel` inside the root and check it against `want`.
fn open_checked(root: &RootFs, rel: &RelPath, want: Option<&Digest>) -> Result<File> {
    let mut f = fsx::open_file_beneath(root.fd(), rel)
        .with_context(|| format!("opening {rel} in {}", root.path.display()))?;
    if let Some(want) = want {
        let (got, _) =
            crate::format::stream::digest_of(std::io::BufReader::with_capacity(256 * 1024, &f))
                .with_context(|| format!("reading {rel}"))?;
        if &got != want {
            bail!(
                "{rel} in {} does not match the image's manifest (sha256 {got}, expected {want})",
                root.path.display()
            );
        }
        f.seek(SeekFrom::Start(0))?;
    }
    Ok(f)
}

/// Open the target kernel and initrd inside the (updated) root and read the
/// command line to pass on.
pub fn prepare_kexec(root: &RootFs, k: &KernelInfo, cmdline_path: &Path) -> Result<KexecImage> {
    let kernel_path = k
        .vmlinuz
        .clone()
        .ok_or_else(|| anyhow!("the image's manifest records no vmlinuz for {}", k.release))?;
    let kernel = open_checked(root, &kernel_path, k.vmlinuz_sha256.as_ref())?;
    let initrd = match &k.initrd {
        Some(p) => Some(open_checked(root, p, k.initrd_sha256.as_ref())?),
        None => None,
    };
    let text = std::fs::read_to_string(cmdline_path)
        .with_context(|| format!("reading {}", cmdline_path.display()))?;
    let cmdline = CString::new(text.trim_end_matches(['\n', '\0']).to_string())
        .with_context(|| format!("{} holds a NUL byte", cmdline_path.display()))?;
    Ok(KexecImage {
        kernel_path,
        kernel,
        initrd_path: k.initrd.clone(),
        initrd,
        cmdline,
    })
}

/// Milliseconds since the Unix epoch.
pub(crate) fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// This boot's id, if the kernel tells.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string(BOOT_ID)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The hooks' view of a kernel change.
fn hook_env(root: &RootFs, rec: &KernelRecord) -> HookEnv {
    HookEnv {
        root: root.path.clone(),
        from: rec.from_image.clone(),
        to: rec.image_id.clone(),
        plan_path: root.runtime_dir().join("plan.json"),
        kernel_changed: true,
    }
}

impl Actuator {
    /// Act on `rec` (pending) with `policy`: record, run the pre-reboot
    /// hooks, kexec or reboot. Returns what was done; the record on disk
    /// says the same. An error means no reboot was requested.
    pub fn act(
        &self,
        root: &RootFs,
        cfg: &Config,
        rec: &mut KernelRecord,
        policy: KernelPolicy,
        progress: &Progress,
    ) -> Result<Action> {
        rec.policy = policy;
        if policy == KernelPolicy::Defer {
            rec.action = Action::Deferred;
            save(root, rec)?;
            return Ok(Action::Deferred);
        }
        if !root.is_host_root() && !self.any_root {
            rec.action = Action::NotHostRoot;
            save(root, rec)?;
            return Ok(Action::NotHostRoot);
        }
        let runner = HookRunner::for_root(&root.path, Duration::from_secs(cfg.hook_timeout_secs));
        if let Err(e) = runner.run(HookPhase::PreReboot, &hook_env(root, rec)) {
            rec.action = Action::Deferred;
            rec.action_error = Some(format!("{e}"));
            save(root, rec)?;
            return Err(anyhow::Error::new(e).context(format!(
                "no {} into {}: a pre-reboot hook failed; run `imageupd reboot` when it is fixed",
                policy_word(policy),
                rec.target.release
            )));
        }
        let mut errors: Vec<String> = Vec::new();
        if policy == KernelPolicy::Kexec {
            match self.kexec(root, rec, progress) {
                Ok(()) => return Ok(Action::Kexec),
                Err(e) => {
                    let msg = format!(
                        "kexec into {} failed, rebooting instead: {e:#}",
                        rec.target.release
                    );
                    tracing::warn!("{msg}");
                    progress.line(&msg);
                    errors.push(format!("{e:#}"));
                }
            }
        }
        rec.action = Action::Reboot;
        rec.action_error = (!errors.is_empty()).then(|| errors.join("; "));
        rec.requested_ms = Some(epoch_ms());
        save(root, rec)?;
        progress.line(&format!(
            "rebooting into {} for image {}",
            rec.target.release, rec.image_id
        ));
        let res = dbus::Manager::connect(&self.bus).and_then(|m| m.reboot());
        match res {
            Ok(via) => {
                tracing::info!("reboot requested through {via:?}");
                Ok(Action::Reboot)
            }
            Err(e) => {
                errors.push(format!("{e:#}"));
                rec.action = Action::Failed;
                rec.action_error = Some(errors.join("; "));
                save(root, rec)?;
                Err(e.context(format!("could not request a reboot into {}; the root is updated and the reboot is still required", rec.target.release)))
            }
        }
    }

    /// Load the target kernel, record, and start `kexec.target`. On a
    /// failure after the load, the loaded kernel is unloaded again.
    fn kexec(&self, root: &RootFs, rec: &mut KernelRecord, progress: &Progress) -> Result<()> {
        let img = prepare_kexec(root, &rec.target, &self.cmdline_path)?;
        self.loader.load(&img)?;
        rec.action = Action::Kexec;
        rec.requested_ms = Some(epoch_ms());
        let started = save(root, rec).and_then(|()| {
            progress.line(&format!(
                "kexec into {} for image {} (command line {:?})",
                rec.target.release, rec.image_id, img.cmdline
            ));
            dbus::Manager::connect(&self.bus)?.kexec()
        });
        match started {
            Ok(job) => {
                tracing::info!("kexec.target started ({job})");
                Ok(())
            }
            Err(e) => {
                self.loader.unload();
                Err(e)
            }
        }
    }
}

/// After an apply (SPEC §5 step 8): when it changed the kernel, record the
/// change and act on `policy`; when it made the root's kernel the running
/// one again, mark an older pending change superseded. Fills
/// `report.kernel.action`; problems become warnings (the update itself is
/// committed either way).
pub fn after_apply(
    act: &Actuator,
    root: &RootFs,
    cfg: &Config,
    policy: KernelPolicy,
    report: &mut ApplyReport,
    progress: &Progress,
) {
    if report.result != "applied" {
        return;
    }
    if !report.kernel.changed {
        match load(root) {
            Ok(Some(mut rec)) if rec.state == KernelState::Pending && rec.image_id != report.id => {
                rec.state = KernelState::Superseded;
                if let Err(e) = save(root, &rec) {
                    report.warnings.push(format!("{e:#}"));
                }
            }
            Ok(_) => {}
            Err(e) => report.warnings.push(format!("{e:#}")),
        }
        return;
    }
    let Some(target) = report.kernel.target_kernel.clone() else {
        return;
    };
    let mut rec = KernelRecord {
        image_id: report.id.clone(),
        from_image: report.from_id.clone(),
        target,
        from_release: rootfs::running_release().filter(|_| root.is_host_root()),
        reason: report.kernel.reason.clone().unwrap_or_default(),
        policy,
        state: KernelState::Pending,
        action: Action::Deferred,
        action_error: None,
        recorded: crate::sys::clock::now_rfc3339(),
        boot_id: boot_id(),
        requested_ms: None,
        booted_release: None,
        confirmed: None,
        request_to_confirm_ms: None,
        error: None,
    };
    let res = act.act(root, cfg, &mut rec, policy, progress);
    report.kernel.action = Some(rec.action.as_str().to_string());
    if let Err(e) = res {
        let msg = format!("{e:#}");
        tracing::error!("{msg}");
        report.warnings.push(msg);
    }
}

/// `imageupd reboot`: act now on a pending kernel change, with `policy`
/// (default: the configured one; `defer` means kexec here, since the
/// operator asks for the reboot). `Ok(None)` when nothing is pending.
pub fn reboot_now(
    act: &Actuator,
    root: &RootFs,
    cfg: &Config,
    policy: Option<KernelPolicy>,
    progress: &Progress,
) -> Result<Option<Action>> {
    let _lock = Lock::acquire(&root.runtime_dir())?;
    let Some(mut rec) = load(root)? else {
        return Ok(None);
    };
    if rec.state != KernelState::Pending {
        return Ok(None);
    }
    if root.is_host_root()
        && rootfs::running_release().as_deref() == Some(rec.target.release.as_str())
    {
        // Booted into it already (the boot check has not run yet).
        confirm(
            root,
            &mut rec,
            rootfs::running_release().as_deref(),
            boot_id().as_deref(),
        )?;
        return Ok(None);
    }
    let policy = match policy.unwrap_or(cfg.kernel_policy) {
        KernelPolicy::Defer => KernelPolicy::Kexec,
        p => p,
    };
    rec.action_error = None;
    rec.boot_id = boot_id();
    act.act(root, cfg, &mut rec, policy, progress).map(Some)
}

/// Compare the running kernel (`running`, in the boot `this_boot`) with a
/// pending record and record the outcome. True when the state changed.
pub fn confirm(
    root: &RootFs,
    rec: &mut KernelRecord,
    running: Option<&str>,
    this_boot: Option<&str>,
) -> Result<bool> {
    let now_ms = epoch_ms();
    if running == Some(rec.target.release.as_str()) {
        rec.state = KernelState::Complete;
    } else if rec.boot_id.is_some()
        && this_boot != rec.boot_id.as_deref()
        && matches!(rec.action, Action::Kexec | Action::Reboot)
    {
        rec.state = KernelState::Failed;
        rec.error = Some(format!(
            "after the {} the node runs kernel {}, not the image's {} (with a reboot, does the boot loader's default entry boot the image's kernel?)",
            rec.action.as_str(),
            running.unwrap_or("(unknown)"),
            rec.target.release
        ));
    } else {
        return Ok(false);
    }
    rec.booted_release = running.map(str::to_string);
    rec.confirmed = Some(crate::sys::clock::now_rfc3339());
    rec.request_to_confirm_ms = rec.requested_ms.map(|r| now_ms.saturating_sub(r));
    save(root, rec)?;
    Ok(true)
}

/// What [`confirm_boot`] found and did.
#[derive(Debug, Default, Serialize)]
pub struct BootCheck {
    /// The kernel record after the check.
    pub record: Option<KernelRecord>,
    /// The check changed the record's state (pending → complete/failed).
    pub confirmed: bool,
    /// Module directories removed, relative to the root.
    pub pruned: Vec<String>,
}

/// After a boot: settle a pending kernel change (complete when the target
/// kernel runs, failed when the node booted another one) and remove stale
/// module directories. Only the running system's root has a running
/// kernel; for other roots this reads the record and changes nothing.
pub fn confirm_boot(root: &RootFs) -> Result<BootCheck> {
    let mut out = BootCheck {
        record: load(root)?,
        ..Default::default()
    };
    if !root.is_host_root() {
        return Ok(out);
    }
    let _lock = Lock::acquire(&root.runtime_dir())?;
    if let Some(rec) = out
        .record
        .as_mut()
        .filter(|r| r.state == KernelState::Pending)
    {
        out.confirmed = confirm(
            root,
            rec,
            rootfs::running_release().as_deref(),
            boot_id().as_deref(),
        )?;
        if out.confirmed {
            match rec.state {
                KernelState::Complete => tracing::info!("{}", rec.describe()),
                _ => tracing::error!("{}", rec.describe()),
            }
        }
    }
    if let Some(running) = rootfs::running_release() {
        let cfg = Config::load(&root.path)?;
        out.pruned = prune_stale_modules(root, &cfg, &running)?;
    }
    Ok(out)
}

/// What the current image says about module directories.
struct ImageModules {
    /// Releases whose module directory the image holds.
    releases: BTreeSet<Vec<u8>>,
    /// The image's mtime of each of [`MODULE_DIRS`] it holds, ns.
    dir_mtimes: Vec<(&'static str, i64)>,
}

/// Releases whose module directory the current image holds.
fn image_module_releases(root: &RootFs) -> Result<Option<ImageModules>> {
    let Some(state) = root.state_dir()? else {
        return Ok(None);
    };
    let bytes = match fsx::read_beneath(
        state.as_fd(),
        &RelPath(crate::fs::rootfs::CURRENT_MANIFEST.to_vec()),
    ) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("reading the current image's manifest"),
    };
    let m = crate::format::codec::decode_manifest(&bytes)?;
    let mut out = ImageModules {
        releases: BTreeSet::new(),
        dir_mtimes: Vec::new(),
    };
    for e in m.entries.iter().filter(|e| e.ftype == FileType::Dir) {
        for base in MODULE_DIRS {
            if e.path.as_bytes() == base.as_bytes() {
                out.dir_mtimes.push((base, e.mtime_ns));
            }
            if let Some(rest) = e
                .path
                .as_bytes()
                .strip_prefix(base.as_bytes())
                .and_then(|r| r.strip_prefix(b"/"))
            {
                if !rest.is_empty() && !rest.contains(&b'/') {
                    out.releases.insert(rest.to_vec());
                }
            }
        }
    }
    Ok(Some(out))
}

/// Remove `lib/modules/<release>` directories that the current image does
/// not contain, except the running kernel's and preserved paths, and give
/// the parent directory its mtime from the image again. Nothing is removed
/// when the root has no record of its current image.
pub fn prune_stale_modules(root: &RootFs, cfg: &Config, running: &str) -> Result<Vec<String>> {
    let Some(keep) = image_module_releases(root)? else {
        return Ok(Vec::new());
    };
    let preserve = Preserve::new(&cfg.preserve).map_err(anyhow::Error::msg)?;
    let mut stale: Vec<(&str, Vec<u8>)> = Vec::new();
    for base in MODULE_DIRS {
        // `lib` is a symlink to `usr/lib` on merged-/usr systems; opening
        // never follows it, so each directory is visited once.
        let Ok(dir) = fsx::open_dir_beneath(root.fd(), &RelPath(base.as_bytes().to_vec())) else {
            continue;
        };
        for name in fsx::read_dir_names(dir.as_fd()).with_context(|| format!("listing {base}"))? {
            let rel = RelPath([base.as_bytes(), b"/", &name].concat());
            let is_dir = fsx::stat_at(dir.as_fd(), &name).is_ok_and(|s| s.ftype == FileType::Dir);
            if is_dir
                && name != running.as_bytes()
                && !keep.releases.contains(&name)
                && !preserve.matches(&rel)
            {
                stale.push((base, name));
            }
        }
    }
    if stale.is_empty() {
        return Ok(Vec::new());
    }
    with_writable(root, || {
        let mut removed = Vec::new();
        for (base, name) in &stale {
            let dir = fsx::open_dir_beneath(root.fd(), &RelPath(base.as_bytes().to_vec()))
                .with_context(|| format!("opening {base}"))?;
            let shown = format!("{base}/{}", String::from_utf8_lossy(name));
            fsx::remove_tree_at(dir.as_fd(), name, root.dev)
                .with_context(|| format!("removing stale modules {shown}"))?;
            tracing::info!("removed {shown}: neither the current image nor the running kernel {running} uses it");
            removed.push(shown);
            if let Some((_, mtime)) = keep.dir_mtimes.iter().find(|(b, _)| b == base) {
                fsx::set_mtime_fd(dir.as_fd(), *mtime)
                    .with_context(|| format!("restoring the mtime of {base}"))?;
            }
        }
        Ok(removed)
    })
}
