//! Composable readers for content on its way to the root.
//!
//! An object travels `File → zstd::Decoder → VerifyReader → stage writer`; the
//! verdict is read only after the stream is drained to EOF, so a decoder that
//! stops early cannot leave a digest unchecked (the lesson of
//! coreos-installer CVE-2021-20319).

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

use crate::format::manifest::Digest;

/// Hashes and counts everything read through it.
pub struct VerifyReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

/// The outcome of a drained [`VerifyReader`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The bytes differ from what the manifest promised.
    #[error("content digest mismatch: expected sha256 {expected}, got {actual} ({bytes} bytes read, {expected_size} expected)")]
    Mismatch {
        /// Digest from the manifest.
        expected: Digest,
        /// Digest of what was read.
        actual: Digest,
        /// Bytes read.
        bytes: u64,
        /// Size from the manifest.
        expected_size: u64,
    },
}

impl<R: Read> VerifyReader<R> {
    /// Wrap a reader.
    pub fn new(inner: R) -> Self {
        VerifyReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Drain whatever is left (so trailing garbage is hashed too) and compare.
    pub fn finish(
        mut self,
        expected: &Digest,
        expected_size: u64,
    ) -> io::Result<Result<(), VerifyError>> {
        io::copy(&mut self, &mut io::sink())?;
        let actual = Digest(self.hasher.finalize().into());
        if &actual == expected && self.bytes == expected_size {
            Ok(Ok(()))
        } else {
            Ok(Err(VerifyError::Mismatch {
                expected: *expected,
                actual,
                bytes: self.bytes,
                expected_size,
            }))
        }
    }

    /// Drain and return the digest and length of everything read.
    pub fn digest(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest(self.hasher.finalize().into()), self.bytes))
    }
}

impl<R: Read> Read for VerifyReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// More bytes than a [`CappedReader`] allows (a decompression bomb, or a
/// file that grew).
#[derive(Debug, thiserror::Error)]
#[error("more than the {cap} bytes declared; refused")]
pub struct OverCap {
    /// The declared size, in bytes.
    pub cap: u64,
}

/// Passes at most `cap` bytes through; one more is an error ([`OverCap`]),
/// never a silent truncation. Put it right after a decompressor, so its
/// output stops at the size the manifest declares.
pub struct CappedReader<R> {
    inner: R,
    left: u64,
    cap: u64,
}

impl<R: Read> CappedReader<R> {
    /// Allow `cap` bytes out of `inner`.
    pub fn new(inner: R, cap: u64) -> Self {
        CappedReader {
            inner,
            left: cap,
            cap,
        }
    }
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // At the cap: the stream must end here.
            let mut b = [0u8; 1];
            return match self.inner.read(&mut b)? {
                0 => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    OverCap { cap: self.cap },
                )),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Hash a whole reader.
pub fn digest_of<R: Read>(r: R) -> io::Result<(Digest, u64)> {
    VerifyReader::new(r).digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_reader_errors_past_the_cap() {
        let mut out = Vec::new();
        assert_eq!(
            CappedReader::new(&b"abc"[..], 3)
                .read_to_end(&mut out)
                .unwrap(),
            3
        );
        let e = CappedReader::new(&b"abcd"[..], 3)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert!(e.get_ref().is_some_and(|i| i.is::<OverCap>()), "{e}");
        // A zstd bomb: a few hundred bytes that decompress to 64 MiB.
        let bomb = zstd::encode_all(&vec![0u8; 64 << 20][..], 3).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let dec = zstd::stream::read::Decoder::new(&bomb[..]).unwrap();
        let r = VerifyReader::new(CappedReader::new(dec, 1000)).finish(&Digest::of(b"x"), 1000);
        assert!(
            r.is_err(),
            "a bomb must fail as an I/O error, not run to its end"
        );
    }

    #[test]
    fn verifies_and_detects_mismatch() {
        let d = Digest::of(b"abc");
        let mut r = VerifyReader::new(&b"abc"[..]);
        let mut buf = [0u8; 1];
        r.read_exact(&mut buf).unwrap();
        // Not drained by the caller: finish drains it before judging.
        assert!(r.finish(&d, 3).unwrap().is_ok());
        let r = VerifyReader::new(&b"abd"[..]);
        assert!(r.finish(&d, 3).unwrap().is_err());
        let r = VerifyReader::new(&b"abcx"[..]);
        assert!(
            r.finish(&d, 3).unwrap().is_err(),
            "trailing bytes must fail"
        );
    }
}
