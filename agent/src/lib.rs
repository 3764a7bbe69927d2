//! imageupd: in-place golden-image updates for deployed Linux nodes.
//!
//! The library holds the whole engine; `main.rs` is a thin command line.
//! One folder per layer, listed from the bottom up; each layer uses only
//! the layers listed before it (no import cycles between files or
//! folders):
//!
//! - [`sys`]: system edges (errors, faults, commands, logging, progress);
//! - [`format`](mod@format): the store format on bytes (manifests, signatures, packs,
//!   deltas, manifest frames);
//! - [`fs`]: local file systems (fd-relative primitives, the store
//!   directory, scanning a tree, the root and its state directory);
//! - [`publish`]: getting images into a store, packs, deltas, serving it;
//! - [`net`]: the network client (sources, downloads);
//! - [`engine`]: changing a node's root crash-safely (plan, stage, swap,
//!   journal, record, verify, hooks, settings);
//! - [`boot`]: acting on a kernel change and confirming the boot;
//! - [`apply`]: the update pipeline, one command's steps in order;
//! - [`fleet`]: fleet rollout (etcd slots, health gate, rollback in place,
//!   breaker, phases, windows) between the pipeline and the agent;
//! - [`agent`]: the node agent and its metadata;
//! - [`fuzzing`]: entry points of the fuzz targets (`fuzz/`) and their
//!   corpus replay, over the parsers of untrusted bytes in every layer.
//! - [`provision`]: making a bare node's disks a bootable node of an image
//!   (partitions, filesystems, the image through [`apply`], bootloader,
//!   configdrive).

pub mod agent;
pub mod apply;
pub mod boot;
pub mod engine;
pub mod fleet;
pub mod format;
pub mod fs;
pub mod fuzzing;
pub mod net;
pub mod provision;
pub mod publish;
pub mod sys;
