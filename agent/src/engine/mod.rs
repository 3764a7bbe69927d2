//! The node engine: what must change in the root ([`plan`]), staging the
//! new content ([`stage`]), the crash-safe swap and its journal ([`swap`],
//! [`journal`]), the old inodes kept for a rollback in place ([`keep`]),
//! recording the applied image ([`record`]), checking a root against its
//! manifest ([`verify`]), remounting it, the hooks, lock and lifecycle
//! status around the swap, the node's settings ([`config`]) and what an
//! apply reports ([`report`]). Uses [`crate::net`], [`crate::fs`],
//! [`crate::format`] and [`crate::sys`].

pub mod config;
pub mod hooks;
pub mod journal;
pub mod keep;
pub mod lifecycle;
pub mod lock;
pub mod plan;
pub mod record;
pub mod releases;
pub mod remount;
pub mod report;
pub mod stage;
pub mod status;
pub mod swap;
pub mod trust_state;
pub mod verify;
