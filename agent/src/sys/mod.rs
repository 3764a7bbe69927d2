//! System edges: exit kinds and errors, fault injection for crash tests,
//! external commands, logging, progress output, fast hash maps, a
//! parallel map, the wall clock, retry backoff, `open_by_handle_at` and early writeback. Nothing here knows
//! about images; this layer uses no other part of the crate.

pub mod backoff;
pub mod clock;
pub mod cmd;
pub mod error;
pub mod fastmap;
pub mod fault;
pub mod handle;
pub mod logging;
pub mod metrics;
pub mod par;
pub mod progress;
pub mod writeback;
