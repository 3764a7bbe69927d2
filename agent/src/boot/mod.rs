//! Acting on a kernel change: after an apply, kexec, reboot or defer by
//! policy ([`reboot`]), through systemd/logind over D-Bus ([`dbus`]) or the
//! kexec syscalls ([`kexec`], [`kexec_sys`], the one module allowed
//! `unsafe`), keeping the change in the state directory ([`record`]) and
//! confirming the boot afterwards ([`confirm`]). Uses [`crate::engine`] and
//! the layers below it.

pub mod confirm;
pub mod dbus;
pub mod kexec;
pub mod kexec_sys;
pub mod reboot;
pub mod record;
