//! Copying into files with holes where whole chunks are zero, so a sparse
//! file of the image stays sparse on the node (staging, and the download
//! cache whose plain copies staging links into place).

use std::io::{self, Read, Seek, SeekFrom, Write};

/// Which side of a copy failed.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the source (decoding, I/O).
    Read(io::Error),
    /// Writing the destination (e.g. ENOSPC).
    Write(io::Error),
}

/// Copy `r` into `out` through `buf`, seeking over every `buf`-sized chunk
/// that is all zeros; `tick` sees each chunk's length. Returns the bytes
/// copied. The caller sets the final length (`set_len`): a file that ends
/// in a hole is otherwise short.
pub fn copy<R: Read, W: Write + Seek>(
    r: &mut R,
    out: &mut W,
    buf: &mut [u8],
    mut tick: impl FnMut(u64),
) -> Result<u64, CopyError> {
    let mut total = 0u64;
    loop {
        let filled = fill(r, buf).map_err(CopyError::Read)?;
        if filled == 0 {
            break;
        }
        let chunk = &buf[..filled];
        let res = if is_zero(chunk) {
            out.seek(SeekFrom::Current(filled as i64)).map(|_| ())
        } else {
            out.write_all(chunk)
        };
        res.map_err(CopyError::Write)?;
        total += filled as u64;
        tick(filled as u64);
        if filled < buf.len() {
            break;
        }
    }
    Ok(total)
}

/// Read until `buf` is full or `r` ends; returns how much was read.
pub fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// True when every byte of `b` is zero.
pub fn is_zero(b: &[u8]) -> bool {
    /// A block of zeros to compare against with `memcmp`.
    static ZERO: [u8; 4096] = [0; 4096];
    b.chunks(ZERO.len()).all(|c| c == &ZERO[..c.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn zero_chunks_become_holes_and_data_is_kept() {
        let mut data = vec![0u8; 3 * 8192];
        data[8192..8200].copy_from_slice(b"not zero");
        let f = tempfile::tempfile().expect("tempfile");
        let mut out = f.try_clone().expect("clone");
        let mut ticks = 0;
        let n = copy(&mut Cursor::new(&data), &mut out, &mut [0u8; 8192], |_| {
            ticks += 1
        })
        .expect("copy");
        assert_eq!((n, ticks), (data.len() as u64, 3));
        out.set_len(n).expect("len");
        let mut back = Vec::new();
        let mut f = f;
        f.seek(SeekFrom::Start(0)).expect("seek");
        f.read_to_end(&mut back).expect("read");
        assert_eq!(back, data);
        assert!(is_zero(&[0; 10]) && !is_zero(&[0, 0, 1]));
    }
}
