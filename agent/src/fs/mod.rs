//! Local file systems: fd-relative primitives beneath a root ([`fsx`]),
//! the content-addressed store directory ([`store`]), scanning a tree
//! into manifest entries with its stamp cache ([`scan`], [`stamps`]), the
//! preserve rules, the root being updated with its state directory
//! ([`rootfs`]), and change tracking of that root between walks
//! ([`track`]). Uses [`crate::format`] and [`crate::sys`].

pub mod fsx;
pub mod node;
pub mod preserve;
pub mod rootfs;
pub mod scan;
pub mod sparse;
pub mod stamps;
pub mod store;
pub mod track;
