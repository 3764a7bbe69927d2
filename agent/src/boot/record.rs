//! The record of a root's last kernel change (`kernel.json` in the state
//! directory), so that it survives the reboot.

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::engine::config::KernelPolicy;
use crate::engine::remount;
use crate::format::manifest::{KernelInfo, RelPath};
use crate::fs::fsx;
use crate::fs::rootfs::{self, RootFs};

/// File name of the kernel record, in the state directory.
pub const RECORD_NAME: &[u8] = b"kernel.json";

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
pub(crate) fn with_writable<T>(root: &RootFs, f: impl FnOnce() -> Result<T>) -> Result<T> {
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

/// Milliseconds since the Unix epoch.
pub fn epoch_ms() -> u64 {
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

/// This boot's id.
pub const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
