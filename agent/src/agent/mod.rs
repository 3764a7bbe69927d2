//! The node agent: the long-running loop that watches the node's metadata
//! for a new target and applies it ([`daemon`]), the decision it acts on,
//! kept apart from the loop ([`decide`]), `apply --from-metadata`
//! ([`from_metadata`]), its record of what it applied and what failed
//! ([`record`]), reading os-collect-config metadata ([`metadata`]),
//! watching files ([`watch`]) and talking to systemd ([`sdnotify`]). Uses
//! [`crate::apply`] and every layer below.

pub mod daemon;
pub mod decide;
pub mod from_metadata;
pub mod metadata;
pub mod metrics;
pub mod record;
pub mod sdnotify;
pub mod watch;
