//! Publishing and serving: getting images (directories, tarballs, disk
//! images) into a signed store ([`image`], [`disk`]), building its packs
//! and update deltas ([`pack`], [`delta`]), and serving it over HTTP(S)
//! ([`serve`]). Uses [`crate::fs`], [`crate::format`] and [`crate::sys`];
//! nothing on a node depends on this layer.

pub mod delta;
pub mod disk;
pub mod image;
pub mod pack;
pub mod release;
pub mod serve;
pub mod trust;
