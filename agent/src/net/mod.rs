//! The network client: where an image comes from and how its manifest is
//! resolved and trusted ([`source`]), and downloading what a plan needs
//! from an HTTP(S) store — loose objects, packs, deltas, manifest frames,
//! with a download cache ([`fetch`]). Uses [`crate::fs`],
//! [`crate::format`] and [`crate::sys`].

pub mod fetch;
pub mod limits;
pub mod source;
