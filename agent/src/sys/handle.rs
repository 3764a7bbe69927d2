//! `open_by_handle_at(2)`: the only `unsafe` of change tracking.
//!
//! fanotify names the directory an event happened in by kernel file
//! handle; this turns one back into a descriptor, so the tracker can tell
//! which path of the root changed. The kernel validates the handle itself
//! (a stale one fails with `ESTALE`), and only a byte buffer we own crosses
//! the boundary. Needs `CAP_DAC_READ_SEARCH`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Largest handle accepted, in bytes (`MAX_HANDLE_SZ`).
pub const MAX_HANDLE_BYTES: usize = 128;

/// Open the inode `bytes` (of type `htype`) names on the filesystem that
/// `mount` is on, as an `O_PATH` descriptor (nothing is read through it).
pub fn open_by_handle(mount: BorrowedFd<'_>, htype: i32, bytes: &[u8]) -> io::Result<OwnedFd> {
    if bytes.len() > MAX_HANDLE_BYTES {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // struct file_handle { u32 handle_bytes; i32 handle_type; u8 f_handle[]; },
    // built in a u32-aligned buffer of our own.
    let mut buf = [0u32; 2 + MAX_HANDLE_BYTES / 4];
    buf[0] = bytes.len() as u32;
    buf[1] = htype as u32;
    for (word, chunk) in buf[2..].iter_mut().zip(bytes.chunks(4)) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        *word = u32::from_ne_bytes(w);
    }
    // SAFETY: `buf` outlives the call, is aligned for `file_handle` and
    // holds `handle_bytes` bytes after its 8-byte head, as the kernel reads.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
