//! Helpers shared by the integration tests, one file per concern:
//!
//! * [`run`]: running the `imageupd` binary and other commands (exit codes,
//!   time limits, captured output, background processes);
//! * [`trees`]: the cached fixture trees and scratch directories;
//! * [`store`]: keys, trust, publishing, the shared store and its copies;
//! * [`node`]: scratch nodes, `apply`/`verify` on them, "applied" checks;
//! * [`mounts`]: mountinfo and loop-mounted filesystems;
//! * [`preserve`]: the contract's preserve list;
//! * [`oracle`]: two independent oracles that never use imageupd's code:
//!   `rsync -naHAX --delete --checksum --itemize-changes` with the preserve
//!   list excluded (it prints nothing when ROOT equals IMAGE), and
//!   [`meta_diff`], a walk of both trees comparing type, content digest,
//!   symlink target, device number, mode, owner, mtime to the nanosecond,
//!   every xattr, and hardlink groups (which rsync does not check when a
//!   group is split);
//! * [`serve`]: `imageupd serve` run by a test;
//! * [`net`]: helpers of the network tests (store copies, `apply --from
//!   URL`, the download report);
//! * [`http`]: the one HTTP test server (a small file server with faults on
//!   request), a raw HTTP client, and a stock nginx;
//! * [`nodekit`]: a managed node with a local store, for the agent tests;
//! * [`vm`]: the QEMU scaffolding of tests/vm.rs;
//! * [`logwrites`]: a replayer of dm-log-writes logs, and [`powerloss`]:
//!   the guest of tests/powerloss.rs (initramfs, disks, one TCG boot);
//! * [`rng`]: a deterministic PRNG.
//!
//! Every test binary includes this module and uses a different subset of it.
#![allow(dead_code)]

pub mod etcd;
pub mod fleet;
pub mod http;
pub mod logwrites;
pub mod mounts;
pub mod net;
pub mod node;
pub mod nodekit;
pub mod oracle;
pub mod powerloss;
pub mod preserve;
pub mod rng;
pub mod run;
pub mod serve;
pub mod store;
pub mod store_cache;
pub mod trees;
pub mod vm;

// Not every test binary uses every helper.
#[allow(unused_imports)]
pub use {mounts::*, node::*, oracle::*, preserve::*, rng::*, run::*, store::*, trees::*};
