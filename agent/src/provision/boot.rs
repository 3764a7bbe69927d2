//! The UEFI bootloader: a standalone GRUB (all modules and its grub.cfg in
//! one EFI binary, built by grub-mkstandalone) on the ESP's removable path
//! `EFI/BOOT/BOOTX64.EFI`, so no NVRAM entry is needed and grub-install
//! (which cannot find a GRUB drive on a loop device) is not used. The
//! config boots the image's own kernel and initrd from the root by UUID,
//! through Debian's `/vmlinuz` and `/initrd.img` links when the image has
//! them, so a later kernel update in place needs no new loader.

use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Context, Result};

use crate::sys::cmd::run;

/// The ESP's removable-media path of the x86-64 loader.
pub const REMOVABLE_PATH: &str = "EFI/BOOT/BOOTX64.EFI";
/// Kernel command line when the scheme gives none.
pub const DEFAULT_CMDLINE: &str = "ro";

/// Kernel and initrd paths inside the root (absolute, as GRUB sees them
/// on the root filesystem).
#[derive(Debug, PartialEq, Eq)]
pub struct Kernel {
    /// e.g. `/vmlinuz` or `/boot/vmlinuz-6.1.0-27-cloud-amd64`.
    pub linux: String,
    /// The initrd, if the image has one.
    pub initrd: Option<String>,
}

/// Pick the kernel from the root's file names: `/vmlinuz` (+ `/initrd.img`)
/// links first, else the highest `boot/vmlinuz-*` with its initrd.
pub fn pick_kernel(top: &[String], boot: &[String]) -> Option<Kernel> {
    if top.iter().any(|n| n == "vmlinuz") {
        return Some(Kernel {
            linux: "/vmlinuz".into(),
            initrd: top
                .iter()
                .any(|n| n == "initrd.img")
                .then(|| "/initrd.img".into()),
        });
    }
    let mut versions: Vec<&str> = boot
        .iter()
        .filter_map(|n| n.strip_prefix("vmlinuz-"))
        .collect();
    versions.sort_by(|a, b| version_cmp(a, b));
    let v = versions.last()?;
    let initrd = format!("initrd.img-{v}");
    Some(Kernel {
        linux: format!("/boot/vmlinuz-{v}"),
        initrd: boot.contains(&initrd).then(|| format!("/boot/{initrd}")),
    })
}

/// Compare kernel versions by their numeric runs.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter(|x| !x.is_empty())
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    key(a).cmp(&key(b))
}

/// The grub.cfg embedded in the loader.
pub fn grub_cfg(root_uuid: &str, k: &Kernel, cmdline: &str) -> String {
    let mut s = format!(
        "# written by imageupd provision\nset timeout=1\nsearch --no-floppy --fs-uuid --set=root {root_uuid}\nmenuentry \"image\" {{\n  linux {} root=UUID={root_uuid} {cmdline}\n",
        k.linux
    );
    if let Some(i) = &k.initrd {
        s.push_str(&format!("  initrd {i}\n"));
    }
    s.push_str("}\n");
    s
}

/// The kernel in a mounted root.
pub fn find_kernel(root: &Path) -> Result<Kernel> {
    let names = |d: &Path| -> Vec<String> {
        std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    pick_kernel(&names(root), &names(&root.join("boot"))).ok_or_else(|| {
        anyhow!("the image has no kernel (no /vmlinuz, no /boot/vmlinuz-*): nothing to boot")
    })
}

/// Build the standalone GRUB for `cfg` into `out`.
pub fn build_loader(cfg: &str, out: &Path) -> Result<()> {
    let dir = out.parent().unwrap_or(Path::new("."));
    let cfg_path = dir.join("grub.cfg");
    std::fs::write(&cfg_path, cfg).with_context(|| format!("writing {}", cfg_path.display()))?;
    run(Command::new("grub-mkstandalone")
        .args([
            "-O",
            "x86_64-efi",
            "--modules=part_gpt part_msdos ext2 xfs fat search search_fs_uuid linux normal echo",
            "-o",
        ])
        .arg(out)
        .arg(format!("boot/grub/grub.cfg={}", cfg_path.display())))
    .context("building the UEFI loader")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn kernel_choice_and_cfg() {
        let k = pick_kernel(&v(&["vmlinuz", "initrd.img", "etc"]), &[]).unwrap();
        assert_eq!(k.linux, "/vmlinuz");
        let k = pick_kernel(
            &v(&["etc"]),
            &v(&[
                "vmlinuz-6.1.0-9-amd64",
                "vmlinuz-6.1.0-27-amd64",
                "initrd.img-6.1.0-27-amd64",
            ]),
        )
        .unwrap();
        assert_eq!(k.linux, "/boot/vmlinuz-6.1.0-27-amd64");
        assert_eq!(k.initrd.as_deref(), Some("/boot/initrd.img-6.1.0-27-amd64"));
        assert_eq!(pick_kernel(&v(&["etc"]), &v(&["grub"])), None);
        let c = grub_cfg("u-1", &k, "ro console=ttyS0");
        assert!(c.contains("search --no-floppy --fs-uuid --set=root u-1\n"));
        assert!(c.contains("linux /boot/vmlinuz-6.1.0-27-amd64 root=UUID=u-1 ro console=ttyS0\n"));
        assert!(c.contains("initrd /boot/initrd.img-6.1.0-27-amd64\n"));
    }
}
