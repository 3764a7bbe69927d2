//! `sync_file_range(2)` to start a file's writeback early: the only
//! `unsafe` of staging.
//!
//! Staging writes every new object, then one `syncfs` makes them durable
//! before the swap. Left to the kernel, the dirty pages wait for that
//! `syncfs` and it pays for all of them at once (on a fresh disk, a whole
//! image). Asking for writeback as each file is finished lets the device
//! work while the next ones are fetched and written; durability still
//! comes from the `syncfs` alone (this call waits for nothing and
//! guarantees nothing).
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Start writing back the dirty pages of the whole file `fd`, without
/// waiting (`SYNC_FILE_RANGE_WRITE`).
pub fn start_writeback(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: plain integer arguments; `fd` is a descriptor we borrow for
    // the call's duration.
    let r = unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
