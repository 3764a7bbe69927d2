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
//! After the boot, [`crate::boot::confirm::confirm_boot`] (run by `imageupd boot-check` and by
//! the agent at start) compares `uname -r` with the recorded target
//! release, records the update complete or failed with the reason, and
//! removes module directories that neither the current image nor the
//! running kernel needs: the apply kept the old kernel's modules while that
//! kernel ran.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::boot::confirm::confirm;
use crate::boot::dbus::{self, Bus};
use crate::boot::kexec::{prepare_kexec, KexecLoader, SyscallLoader, PROC_CMDLINE};
use crate::boot::record::{boot_id, epoch_ms, load, save, Action, KernelRecord, KernelState};
use crate::engine::config::{policy_word, Config, KernelPolicy};
use crate::engine::hooks::{HookEnv, HookPhase, HookRunner};
use crate::engine::lock::Lock;
use crate::engine::report::ApplyReport;
use crate::fs::rootfs::{self, RootFs};
use crate::sys::progress::Progress;

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
