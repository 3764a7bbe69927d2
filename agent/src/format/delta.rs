//! Update deltas: everything a node on the parent image needs, in one
//! static file and (usually) one or two HTTP requests.
//!
//! `publish --parent P` writes, besides loose objects and packs:
//!
//! ```text
//! STORE/images/<id>/deltas/<P>.delta     the update from image P to image <id>
//! ```
//!
//! A delta exists only for the parent named at publish time (without
//! `--parent`: for the store's newest image, when related, see
//! `crate::publish::image`); nodes on any other image use packs and loose
//! objects exactly as before, and so does a node whose delta does not check
//! out. The file is immutable (named by two immutable image ids) and
//! not signed: nothing in it is trusted on its own (see below).
//!
//! File layout (integers little-endian, `varint` = unsigned LEB128):
//!
//! ```text
//! MAGIC (8 bytes) | version u32 | header length u32     the fixed prefix (PREFIX_LEN bytes)
//! header                                                [`Header::encode`]
//! manifest patch                                        zstd frame: the target manifest's JSON,
//!                                                       compressed against the parent's JSON
//! payload                                               one xz stream (x86 BCJ + LZMA2)
//! ```
//!
//! - The header names both images with the sha256 of their stored manifests
//!   (`manifest.json.zst`), embeds the target manifest's detached signature
//!   (so that no extra request is needed for it), and lists the payload's
//!   objects in order with their digest, content size and kind.
//! - The manifest patch decompresses, with the node's current manifest JSON
//!   as zstd prefix, to the target manifest's JSON, which the node
//!   re-encodes to the stored bytes ([`crate::format::mframes`], deterministic for
//!   one zstd build: the current manifest's frame for every piece it has,
//!   the others compressed at the header's frame level, as the publisher
//!   did) and checks against the header's sha256 and then, like
//!   any downloaded manifest, against its signature with the node's trusted
//!   keys ([`crate::format::trust::verify_stored`]).
//! - The payload, once decompressed, is the objects back to back: a *full*
//!   object is its content; a *patch* object is a zstd frame that
//!   decompresses, with the content of the parent's file at the named path
//!   as prefix (`zstd --patch-from`), to the object's content. Every object
//!   is verified against the signed manifest's digest before it enters the
//!   node's download cache.
//! - Objects are the contents the target has and the parent lacks, in
//!   manifest order; a changed file whose old version is a regular file of
//!   at most [`PATCH_MAX_BYTES`] is sent as a patch when that is less than
//!   half the object ([`crate::publish::delta`]).

use std::io::Read;

use crate::format::manifest::{Digest, RelPath, MAX_MANIFEST_BYTES};

mod cursor;
use cursor::Cursor;

/// Directory of an image's deltas inside `images/<id>/`.
pub const DELTAS_DIR: &str = "deltas";
/// File name suffix of a delta (`<parent id>.delta`).
pub const DELTA_SUFFIX: &str = ".delta";
/// First bytes of a delta file.
pub const MAGIC: &[u8; 8] = b"IUDELTA\n";
/// Delta format version written by this build. Version 2 added the level
/// of the target manifest's new frames; version 1 (all frames at
/// [`crate::format::codec::MANIFEST_LEVEL`]) is still read; readers refuse
/// others.
pub const VERSION: u32 = 2;
/// The oldest delta format version this build reads.
pub const MIN_VERSION: u32 = 1;
/// Bytes of the fixed prefix: magic, version, header length.
pub const PREFIX_LEN: usize = 16;
/// Largest header accepted, in bytes.
pub const MAX_HEADER_BYTES: u64 = 64 << 20;
/// Largest embedded signature accepted, in bytes.
pub const MAX_SIG_BYTES: u64 = 64 * 1024;
/// Largest path of a patch reference accepted, in bytes (PATH_MAX).
pub const MAX_PATH_BYTES: u64 = 4096;
/// Largest payload (compressed or not) accepted, in bytes.
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 40;
/// Files (old or new version) larger than this many bytes are never sent as
/// patches: the node holds both in memory while patching.
pub const PATCH_MAX_BYTES: u64 = 32 << 20;
/// Largest zstd window of a patch (manifest or object), as a power of two
/// (128 MiB; the zstd decoder's default limit).
pub const PATCH_WINDOW_LOG_MAX: u32 = 27;
/// LZMA2 dictionary of the payload at most, in bytes (the node's decoder
/// needs about this much memory).
pub const PAYLOAD_DICT_MAX: u32 = 16 << 20;
/// Memory the node's payload decoder may use at most, in bytes.
pub const PAYLOAD_MEMLIMIT: u64 = 64 << 20;

/// The relative path of the delta from image `from` to image `to` inside
/// a store (both ids already validated).
pub fn delta_rel(to: &str, from: &str) -> String {
    format!("images/{to}/{DELTAS_DIR}/{from}{DELTA_SUFFIX}")
}

/// Why a delta's header cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The bytes end before the header does.
    #[error("delta truncated: {0}")]
    Truncated(&'static str),
    /// Not a delta file.
    #[error("not an imageupd delta (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("delta format version {0} is not supported (this imageupd reads versions {MIN_VERSION} to {VERSION})")]
    Version(u32),
    /// A length beyond its limit.
    #[error("delta {what} of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Which length.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A field that is not valid.
    #[error("invalid delta header: {0}")]
    Invalid(String),
}

/// How one object of the payload is coded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The object's content as it is.
    Full,
    /// A zstd frame to decompress with the parent's file as prefix.
    Patch {
        /// sha256 of the reference (the parent's version of the file).
        from: Digest,
        /// Its size in bytes.
        from_size: u64,
        /// Its path in the parent image.
        path: RelPath,
        /// Bytes of the zstd frame in the decompressed payload.
        len: u64,
    },
}

/// One object of the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    /// sha256 of the content.
    pub digest: Digest,
    /// Content size in bytes.
    pub size: u64,
    /// How it is coded.
    pub kind: Kind,
}

impl Object {
    /// Bytes the object takes in the decompressed payload.
    pub fn raw_len(&self) -> u64 {
        match &self.kind {
            Kind::Full => self.size,
            Kind::Patch { len, .. } => *len,
        }
    }
}

/// A delta's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// The image the delta applies to.
    pub from: String,
    /// sha256 of that image's stored manifest.
    pub from_sha256: Digest,
    /// The image it produces.
    pub to: String,
    /// sha256 of the target's stored manifest.
    pub to_sha256: Digest,
    /// The target manifest's detached signature, when it is signed.
    pub sig: Option<Vec<u8>>,
    /// zstd level of the target manifest's frames whose piece of JSON the
    /// parent's manifest lacks (the others are the parent's frames; see
    /// [`crate::format::codec::encode_manifest_framed_child`]), 1 to
    /// [`crate::format::codec::MANIFEST_LEVEL`].
    pub frame_level: i32,
    /// Bytes of the target manifest's JSON.
    pub manifest_len: u64,
    /// Bytes of the manifest patch in the file.
    pub mpatch_len: u64,
    /// Bytes of the (compressed) payload in the file.
    pub payload_len: u64,
    /// The payload's objects, in order.
    pub objects: Vec<Object>,
}

impl Header {
    /// Bytes of the decompressed payload.
    pub fn payload_raw_len(&self) -> u64 {
        self.objects.iter().map(Object::raw_len).sum()
    }

    /// The fixed prefix and the encoded header: the delta file's first bytes.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_as(VERSION)
    }

    /// [`Header::encode`] in format `version` (1 has no frame level).
    fn encode_as(&self, version: u32) -> Vec<u8> {
        let mut h = Vec::with_capacity(256 + self.objects.len() * 40);
        put_bytes(&mut h, self.from.as_bytes());
        h.extend_from_slice(&self.from_sha256.0);
        put_bytes(&mut h, self.to.as_bytes());
        h.extend_from_slice(&self.to_sha256.0);
        match &self.sig {
            None => put_varint(&mut h, 0),
            Some(s) => {
                put_varint(&mut h, 1);
                put_bytes(&mut h, s);
            }
        }
        if version >= 2 {
            put_varint(&mut h, u64::try_from(self.frame_level).unwrap_or(0));
        }
        put_varint(&mut h, self.manifest_len);
        put_varint(&mut h, self.mpatch_len);
        put_varint(&mut h, self.payload_len);
        put_varint(&mut h, self.objects.len() as u64);
        for o in &self.objects {
            h.extend_from_slice(&o.digest.0);
            put_varint(&mut h, o.size);
            match &o.kind {
                Kind::Full => h.push(0),
                Kind::Patch {
                    from,
                    from_size,
                    path,
                    len,
                } => {
                    h.push(1);
                    h.extend_from_slice(&from.0);
                    put_varint(&mut h, *from_size);
                    put_bytes(&mut h, &path.0);
                    put_varint(&mut h, *len);
                }
            }
        }
        let mut out = Vec::with_capacity(PREFIX_LEN + h.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        out
    }

    /// Bytes of the fixed prefix plus header, from a delta's first
    /// [`PREFIX_LEN`] bytes (so a reader knows how much to fetch).
    pub fn head_len(prefix: &[u8]) -> Result<usize, FormatError> {
        let p = prefix
            .get(..PREFIX_LEN)
            .ok_or(FormatError::Truncated("prefix"))?;
        if &p[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(FormatError::Version(version));
        }
        let len = u64::from(u32::from_le_bytes([p[12], p[13], p[14], p[15]]));
        if len > MAX_HEADER_BYTES {
            return Err(FormatError::TooLarge {
                what: "header",
                len,
                max: MAX_HEADER_BYTES,
            });
        }
        Ok(PREFIX_LEN + len as usize)
    }

    /// Parse a delta's first bytes (at least [`Header::head_len`] of them);
    /// returns the header and the offset of the manifest patch.
    pub fn parse(bytes: &[u8]) -> Result<(Header, usize), FormatError> {
        let end = Header::head_len(bytes)?;
        let body = bytes
            .get(PREFIX_LEN..end)
            .ok_or(FormatError::Truncated("header"))?;
        let mut r = Cursor { b: body, at: 0 };
        let from = r.id("from id")?;
        let from_sha256 = r.digest()?;
        let to = r.id("to id")?;
        let to_sha256 = r.digest()?;
        let sig = match r.varint()? {
            0 => None,
            1 => Some(r.bytes(MAX_SIG_BYTES, "signature")?.to_vec()),
            n => return Err(FormatError::Invalid(format!("signature flag {n}"))),
        };
        let frame_level = match version_of(bytes) {
            1 => crate::format::codec::MANIFEST_LEVEL,
            _ => {
                let l = r.varint()?;
                if !(1..=crate::format::codec::MANIFEST_LEVEL as u64).contains(&l) {
                    return Err(FormatError::Invalid(format!("manifest frame level {l}")));
                }
                l as i32
            }
        };
        let manifest_len = r.limited(MAX_MANIFEST_BYTES, "manifest")?;
        let mpatch_len = r.limited(
            crate::format::codec::max_compressed(manifest_len),
            "manifest patch",
        )?;
        let payload_len = r.limited(MAX_PAYLOAD_BYTES, "payload")?;
        let count = r.varint()?;
        // Each object takes at least 34 bytes of header.
        if count > (body.len() / 34) as u64 {
            return Err(FormatError::Truncated("object list"));
        }
        let mut objects = Vec::with_capacity(count as usize);
        let mut raw = 0u64;
        for _ in 0..count {
            let digest = r.digest()?;
            let size = r.limited(MAX_PAYLOAD_BYTES, "object")?;
            let kind = match r.byte()? {
                0 => Kind::Full,
                1 => {
                    let from = r.digest()?;
                    let from_size = r.limited(PATCH_MAX_BYTES, "patch reference")?;
                    let path = RelPath(r.bytes(MAX_PATH_BYTES, "path")?.to_vec());
                    path.validate()
                        .map_err(|why| FormatError::Invalid(format!("patch path {path}: {why}")))?;
                    if path.is_root() {
                        return Err(FormatError::Invalid("patch path is the top".into()));
                    }
                    if size > PATCH_MAX_BYTES {
                        return Err(FormatError::TooLarge {
                            what: "patched object",
                            len: size,
                            max: PATCH_MAX_BYTES,
                        });
                    }
                    let len = r.limited(crate::format::codec::max_compressed(size), "patch")?;
                    Kind::Patch {
                        from,
                        from_size,
                        path,
                        len,
                    }
                }
                k => return Err(FormatError::Invalid(format!("object kind {k}"))),
            };
            let o = Object { digest, size, kind };
            raw = raw.saturating_add(o.raw_len());
            objects.push(o);
        }
        if raw > MAX_PAYLOAD_BYTES {
            return Err(FormatError::TooLarge {
                what: "decompressed payload",
                len: raw,
                max: MAX_PAYLOAD_BYTES,
            });
        }
        if r.at != body.len() {
            return Err(FormatError::Invalid(format!(
                "{} bytes after the object list",
                body.len() - r.at
            )));
        }
        Ok((
            Header {
                from,
                from_sha256,
                to,
                to_sha256,
                sig,
                frame_level,
                manifest_len,
                mpatch_len,
                payload_len,
                objects,
            },
            end,
        ))
    }

    /// Total bytes of the delta file this header describes.
    pub fn file_len(&self, head_len: usize) -> u64 {
        (head_len as u64)
            .saturating_add(self.mpatch_len)
            .saturating_add(self.payload_len)
    }
}

/// Compress `data` as a zstd frame at `level` against `reference` as
/// prefix (`zstd --patch-from`); the window covers both (up to
/// [`PATCH_WINDOW_LOG_MAX`]).
pub fn patch_encode(reference: &[u8], data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = zstd::stream::write::Encoder::with_ref_prefix(Vec::new(), level, reference)?;
    enc.include_checksum(false)?;
    enc.window_log(window_log(reference.len() as u64 + data.len() as u64))?;
    if reference.len() + data.len() > 16 << 20 {
        enc.long_distance_matching(true)?;
    }
    enc.set_pledged_src_size(Some(data.len() as u64))?;
    enc.write_all(data)?;
    enc.finish()
}

/// Decompress a zstd frame made by [`patch_encode`] against `reference`;
/// at most `max` bytes come out (more is an error).
pub fn patch_decode(reference: &[u8], patch: &[u8], max: u64) -> std::io::Result<Vec<u8>> {
    let mut dec = zstd::stream::read::Decoder::with_ref_prefix(patch, reference)?;
    dec.window_log_max(PATCH_WINDOW_LOG_MAX)?;
    let mut out = Vec::with_capacity(max.min(PATCH_MAX_BYTES) as usize);
    dec.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "patch decompresses to more than {max} bytes"
        )));
    }
    Ok(out)
}

/// The decompressed payload of a delta, read object by object in header
/// order ([`Payload::object`], [`Payload::skip`]), then [`Payload::finish`].
pub struct Payload<R: Read> {
    xz: liblzma::read::XzDecoder<R>,
}

/// Why an object could not be taken from a payload.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// Reading or decompressing failed (the stream or the network).
    #[error("reading the delta payload: {0}")]
    Io(#[from] std::io::Error),
    /// The object is not what the manifest says.
    #[error(transparent)]
    Mismatch(#[from] crate::format::stream::VerifyError),
    /// Writing the object out failed.
    #[error("writing object {0}: {1}")]
    Write(Digest, std::io::Error),
}

impl<R: Read> Payload<R> {
    /// Decode the xz payload read from `r` (at most [`PAYLOAD_MEMLIMIT`]
    /// bytes of decoder memory).
    pub fn new(r: R) -> std::io::Result<Payload<R>> {
        let stream = liblzma::stream::Stream::new_stream_decoder(PAYLOAD_MEMLIMIT, 0)?;
        Ok(Payload {
            xz: liblzma::read::XzDecoder::new_stream(r, stream),
        })
    }

    /// The next `len` bytes, exactly (short is an error).
    fn section(&mut self, len: u64, out: &mut dyn std::io::Write) -> Result<(), ObjectError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match self.xz.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(ObjectError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("payload ended {left} bytes early"),
                    )))
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ObjectError::Io(e)),
            };
            out.write_all(&buf[..n])
                .map_err(|e| ObjectError::Write(Digest([0; 32]), e))?;
            left -= n as u64;
        }
        Ok(())
    }

    /// Pass over object `o`.
    pub fn skip(&mut self, o: &Object) -> Result<(), ObjectError> {
        self.section(o.raw_len(), &mut std::io::sink())
    }

    /// Write object `o`'s content to `out`, verified against its digest
    /// once all of it went out (so on an error, discard what `out` got). A
    /// patch needs the reference's content (already verified by the caller).
    pub fn object(
        &mut self,
        o: &Object,
        reference: Option<&[u8]>,
        out: &mut dyn std::io::Write,
    ) -> Result<(), ObjectError> {
        let mut h = HashWriter {
            inner: out,
            hasher: <sha2::Sha256 as sha2::Digest>::new(),
            bytes: 0,
        };
        match (&o.kind, reference) {
            (Kind::Full, _) => self.section(o.size, &mut h).map_err(|e| match e {
                ObjectError::Write(_, e) => ObjectError::Write(o.digest, e),
                e => e,
            })?,
            (Kind::Patch { len, .. }, Some(r)) => {
                let mut patch = Vec::with_capacity(*len as usize);
                self.section(*len, &mut patch)?;
                let content = patch_decode(r, &patch, o.size)?;
                std::io::Write::write_all(&mut h, &content)
                    .map_err(|e| ObjectError::Write(o.digest, e))?;
            }
            (Kind::Patch { .. }, None) => {
                return Err(ObjectError::Io(std::io::Error::other(
                    "a patch object needs its reference",
                )))
            }
        }
        let actual = Digest(sha2::Digest::finalize(h.hasher).into());
        if actual != o.digest || h.bytes != o.size {
            return Err(ObjectError::Mismatch(
                crate::format::stream::VerifyError::Mismatch {
                    expected: o.digest,
                    actual,
                    bytes: h.bytes,
                    expected_size: o.size,
                },
            ));
        }
        Ok(())
    }

    /// After the last object: the stream must end here.
    pub fn finish(mut self) -> Result<(), ObjectError> {
        let mut b = [0u8; 1];
        loop {
            match self.xz.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(ObjectError::Io(std::io::Error::other(
                        "payload continues after its last object",
                    )))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ObjectError::Io(e)),
            }
        }
    }
}

/// Hashes and counts what is written through it.
struct HashWriter<'a> {
    inner: &'a mut dyn std::io::Write,
    hasher: sha2::Sha256,
    bytes: u64,
}

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        sha2::Digest::update(&mut self.hasher, &buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The zstd window log covering `n` bytes, within zstd's and our limits.
fn window_log(n: u64) -> u32 {
    let bits = 64 - n.max(1).saturating_sub(1).leading_zeros();
    bits.clamp(10, PATCH_WINDOW_LOG_MAX)
}

/// The format version in a prefix already checked by [`Header::head_len`].
fn version_of(prefix: &[u8]) -> u32 {
    u32::from_le_bytes([prefix[8], prefix[9], prefix[10], prefix[11]])
}

fn put_varint(out: &mut Vec<u8>, v: u64) {
    crate::format::varint::put(out, v);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[cfg(test)]
mod tests;
