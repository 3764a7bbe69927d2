//! The `kexec_file_load(2)` system call: the only module allowed `unsafe`.
//!
//! The kernel reads the new kernel image and initrd from the two file
//! descriptors itself (and checks the image's signature where the kernel
//! is locked down), so nothing but descriptors and one C string crosses the
//! boundary. The loaded image is started later by systemd (`kexec.target`).
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `KEXEC_FILE_UNLOAD`: unload the currently loaded kernel.
pub const KEXEC_FILE_UNLOAD: libc::c_ulong = 0x1;
/// `KEXEC_FILE_NO_INITRAMFS`: the initrd descriptor is unused.
pub const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

/// Where the kernel tells whether a kexec image is loaded (`0` or `1`).
pub const KEXEC_LOADED: &str = "/sys/kernel/kexec_loaded";

/// Load `kernel` (and `initrd`, if any) with command line `cmdline` as the
/// kernel that a later kexec reboot starts. Needs `CAP_SYS_BOOT`.
pub fn load(
    kernel: BorrowedFd<'_>,
    initrd: Option<BorrowedFd<'_>>,
    cmdline: &CStr,
) -> io::Result<()> {
    let flags = if initrd.is_some() {
        0
    } else {
        KEXEC_FILE_NO_INITRAMFS
    };
    let initrd_fd = initrd.map_or(-1, |f| f.as_raw_fd());
    raw(kernel.as_raw_fd(), initrd_fd, cmdline, flags)
}

/// Unload a loaded kexec kernel, if any.
pub fn unload() -> io::Result<()> {
    raw(-1, -1, c"", KEXEC_FILE_UNLOAD)
}

/// True when the kernel reports a loaded kexec image.
pub fn loaded() -> bool {
    std::fs::read_to_string(KEXEC_LOADED).is_ok_and(|s| s.trim() == "1")
}

#[cfg(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "s390x",
    target_arch = "powerpc64",
    target_arch = "loongarch64"
))]
fn raw(
    kernel_fd: libc::c_int,
    initrd_fd: libc::c_int,
    cmdline: &CStr,
    flags: libc::c_ulong,
) -> io::Result<()> {
    // The length includes the terminating NUL, as the system call requires.
    let len = cmdline.to_bytes_with_nul().len() as libc::c_ulong;
    // SAFETY: kexec_file_load(2) takes two descriptors (the kernel never
    // keeps them past the call), a length, and a pointer to `len` readable
    // bytes ending in NUL: `cmdline` is a valid CStr borrowed for the whole
    // call. It writes to no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel_fd,
            initrd_fd,
            len,
            cmdline.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(any(
    target_arch = "x86_64",
    target_arch = "aarch64",
    target_arch = "riscv64",
    target_arch = "s390x",
    target_arch = "powerpc64",
    target_arch = "loongarch64"
)))]
fn raw(_: libc::c_int, _: libc::c_int, _: &CStr, _: libc::c_ulong) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "kexec_file_load is not available on this architecture",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A descriptor that is no kernel image is refused by the kernel (or
    /// the call is not permitted here); it never succeeds, and the error is
    /// an OS error, not a crash.
    #[test]
    fn refuses_a_non_kernel() {
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsFd;
        let err = load(f.as_fd(), None, c"console=ttyS0").unwrap_err();
        assert!(err.raw_os_error().is_some(), "{err}");
    }
}
