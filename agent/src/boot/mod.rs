//! Acting on a kernel change: kexec, reboot or defer after an apply,
//! through systemd/logind over D-Bus ([`dbus`]) or the kexec syscalls
//! ([`kexec_sys`], the one module allowed `unsafe`), and confirming the
//! boot afterwards ([`reboot`]). Uses [`crate::engine`] and the layers
//! below it.

pub mod dbus;
pub mod kexec_sys;
pub mod reboot;
