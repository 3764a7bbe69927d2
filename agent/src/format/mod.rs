//! The store format: manifests and their encoding, signatures, packs,
//! update deltas, manifest frames, varints, digests of streams, and
//! finding the kernel an image boots. Parsers and encoders on bytes and
//! readers, no file-system or network I/O of their own (beyond reading
//! and writing key files in [`sign`]). Uses only [`crate::sys`].

pub mod codec;
pub mod delta;
pub mod kernel;
pub mod manifest;
pub mod mframes;
pub mod pack;
pub mod sign;
pub mod stream;
pub mod trust;
pub mod tuf;
pub mod varint;
