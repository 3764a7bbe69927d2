//! LEB128 unsigned varints, the number encoding of imageupd's binary files
//! (pack indexes, the stamp cache).

/// A varint that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VarintError {
    /// The bytes end inside the number.
    #[error("truncated")]
    Truncated,
    /// More than 64 bits' worth of continuation bytes.
    #[error("overlong number")]
    Overlong,
}

/// Append `v`.
pub fn put(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Read the number at `*pos`, advancing it.
pub fn get(b: &[u8], pos: &mut usize) -> Result<u64, VarintError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos).ok_or(VarintError::Truncated)?;
        *pos += 1;
        let bits = u64::from(byte & 0x7f);
        // The tenth byte may only carry the 64th bit.
        if shift == 63 && bits > 1 {
            return Err(VarintError::Overlong);
        }
        v |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(VarintError::Overlong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut b = Vec::new();
            put(&mut b, v);
            let mut pos = 0;
            assert_eq!(get(&b, &mut pos), Ok(v));
            assert_eq!(pos, b.len());
        }
        assert_eq!(get(&[0x80], &mut 0), Err(VarintError::Truncated));
        assert_eq!(get(&[0xff; 11], &mut 0), Err(VarintError::Overlong));
        let mut too_big = vec![0xff; 9];
        too_big.push(0x02);
        assert_eq!(get(&too_big, &mut 0), Err(VarintError::Overlong));
    }
}
