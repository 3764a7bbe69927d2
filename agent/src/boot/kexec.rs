//! The kexec path: the target's kernel and initrd, opened inside the
//! updated root and checked against its manifest, and the loader that hands
//! them to the kernel.

use std::ffi::CString;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::boot::kexec_sys;
use crate::format::manifest::{Digest, KernelInfo, RelPath};
use crate::fs::fsx;
use crate::fs::rootfs::RootFs;

/// The running kernel's command line, reused for kexec.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

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

/// Open `rel` inside the root and check it against `want`.
pub(crate) fn open_checked(root: &RootFs, rel: &RelPath, want: Option<&Digest>) -> Result<File> {
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
