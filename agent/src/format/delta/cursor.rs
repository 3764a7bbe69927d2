//! Reading a delta header: a cursor over its bytes that turns truncation
//! and oversized fields into format errors.

use super::FormatError;
use crate::format::manifest::Digest;

/// A bounds-checked reader over header bytes.
pub(super) struct Cursor<'a> {
    pub(super) b: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], FormatError> {
        let n = usize::try_from(n).map_err(|_| FormatError::Truncated(what))?;
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(FormatError::Truncated(what))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub(super) fn byte(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1, "object kind")?[0])
    }

    pub(super) fn varint(&mut self) -> Result<u64, FormatError> {
        crate::format::varint::get(self.b, &mut self.at).map_err(|e| match e {
            crate::format::varint::VarintError::Truncated => FormatError::Truncated("number"),
            crate::format::varint::VarintError::Overlong => {
                FormatError::Invalid("number overflows 64 bits".into())
            }
        })
    }

    pub(super) fn limited(&mut self, max: u64, what: &'static str) -> Result<u64, FormatError> {
        let len = self.varint()?;
        if len > max {
            return Err(FormatError::TooLarge { what, len, max });
        }
        Ok(len)
    }

    pub(super) fn bytes(&mut self, max: u64, what: &'static str) -> Result<&'a [u8], FormatError> {
        let n = self.limited(max, what)?;
        self.take(n, what)
    }

    pub(super) fn digest(&mut self) -> Result<Digest, FormatError> {
        let s = self.take(32, "digest")?;
        let mut d = [0u8; 32];
        d.copy_from_slice(s);
        Ok(Digest(d))
    }

    pub(super) fn id(&mut self, what: &'static str) -> Result<String, FormatError> {
        let b = self.bytes(128, what)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| FormatError::Invalid(format!("{what} is not UTF-8")))?;
        crate::format::manifest::validate_image_id(s).map_err(FormatError::Invalid)?;
        Ok(s.to_string())
    }
}
