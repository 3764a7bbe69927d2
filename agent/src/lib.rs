//! imageupd: in-place golden-image updates for deployed Linux nodes.
//!
//! The library holds the whole engine; `main.rs` is a thin command line.
//! Module map, in the order an update flows through them:
//!
//! - [`manifest`], [`sign`], [`store`], [`publish`], [`disk`], [`pack`],
//!   [`mframes`], [`serve`]: the signed, content-addressed store, how images (directories,
//!   tarballs, disk images) get into it, packs for few round trips, and
//!   serving it;
//! - [`source`], [`fetch`], [`scan`], [`plan`]: what must change in the root
//!   (and downloading it from an HTTP(S) store);
//! - [`stage`], [`swap`], [`journal`], [`apply`]: changing it crash-safely;
//! - [`hooks`], [`lifecycle`], [`status`], [`lock`]: around the swap;
//! - [`verify`], [`kernel`], [`config`]: checks and settings;
//! - [`reboot`], [`dbus`], [`kexec_sys`]: acting on a kernel change
//!   (kexec, reboot or defer) and confirming the boot afterwards;
//! - [`agent`], [`metadata`], [`watch`], [`backoff`], [`sdnotify`],
//!   [`logging`]: the node agent and `apply --from-metadata`;
//! - [`fsx`], [`stream`], [`remount`], [`rootfs`]: system edges.

pub mod agent;
pub mod apply;
pub mod backoff;
pub mod cmd;
pub mod config;
pub mod dbus;
pub mod delta;
pub mod disk;
pub mod error;
pub mod fastmap;
pub mod fault;
pub mod fetch;
pub mod fsx;
pub mod hooks;
pub mod journal;
pub mod kernel;
pub mod kexec_sys;
pub mod lifecycle;
pub mod lock;
pub mod logging;
pub mod manifest;
pub mod metadata;
pub mod mframes;
pub mod pack;
pub mod plan;
pub mod preserve;
pub mod progress;
pub mod publish;
pub mod reboot;
pub mod record;
pub mod remount;
pub mod rootfs;
pub mod scan;
pub mod sdnotify;
pub mod serve;
pub mod sign;
pub mod source;
pub mod stage;
pub mod stamps;
pub mod status;
pub mod store;
pub mod stream;
pub mod swap;
pub mod varint;
pub mod verify;
pub mod watch;
