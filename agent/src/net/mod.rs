//! The network client: where an image comes from and how its manifest is
//! resolved and trusted ([`source`]), and downloading what a plan needs
//! from an HTTP(S) store — loose objects, packs, deltas, manifest frames,
//! with a download cache ([`fetch`]); the keep area in front of a source,
//! for a rollback in place ([`keep_source`]). Uses [`crate::fs`],
//! [`crate::format`] and [`crate::sys`].

pub mod fetch;
pub mod keep_source;
pub mod limits;
pub mod source;
