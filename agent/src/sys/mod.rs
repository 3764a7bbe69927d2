//! System edges: exit kinds and errors, fault injection for crash tests,
//! external commands, logging, progress output, fast hash maps, a
//! parallel map, the wall clock and retry backoff. Nothing here knows
//! about images; this layer uses no other part of the crate.

pub mod backoff;
pub mod clock;
pub mod cmd;
pub mod error;
pub mod fastmap;
pub mod fault;
pub mod logging;
pub mod metrics;
pub mod par;
pub mod progress;
