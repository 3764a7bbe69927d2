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

/// Hash a whole reader.
pub fn digest_of<R: Read>(r: R) -> io::Result<(Digest, u64)> {
    VerifyReader::new(r).digest()
}

#[cfg(test)]
mod tests {
    use super::*;

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
