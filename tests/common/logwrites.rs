//! A replayer of the kernel's dm-log-writes log (drivers/md/dm-log-writes.c;
//! xfstests' replay-log is GPL and not packaged, so this is our own).
//!
//! Log layout, all little-endian, in units of the log's sector size:
//!
//! * sector 0: the super block `{ magic u64, version u64, nr_entries u64,
//!   sectorsize u32 }`;
//! * then one entry per logged request: a header sector `{ sector u64,
//!   nr_sectors u64, flags u64, data_len u64 }` (a MARK's text follows the
//!   header in the same sector, `data_len` bytes), then, for writes, the
//!   request's `nr_sectors` data sectors.
//!
//! A write is logged only once a later flush completed, and only if it had
//! completed before that flush was issued, so the log order is a worst-case
//! on-disk order: replaying entries `0..=i` gives a state the disk may have
//! had at a power cut just after entry `i` (at a FLUSH, FUA or MARK entry).
//!
//! The parsers take bytes and do no I/O; [`Log`] reads the log file.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The super block's magic.
pub const MAGIC: u64 = 0x006a_7366_7773_6872;
/// The only log format version.
pub const VERSION: u64 = 1;
/// Entry flag: a flush (everything logged before it is durable).
pub const FLUSH: u64 = 1;
/// Entry flag: a forced-unit-access write (durable when it completes).
pub const FUA: u64 = 2;
/// Entry flag: a discard of `nr_sectors` (no data follows).
pub const DISCARD: u64 = 4;
/// Entry flag: a mark (`dmsetup message … mark TEXT`; no data follows).
pub const MARK: u64 = 8;
/// Entry flag: a metadata write (informational).
pub const METADATA: u64 = 16;
/// Size of the super block and entry header fields, in bytes.
const HEADER_BYTES: usize = 32;
/// Largest sector size accepted, in bytes.
const MAX_SECTOR_SIZE: u32 = 64 * 1024;

/// The log's super block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Super {
    /// Entries in the log.
    pub nr_entries: u64,
    /// Log sector size, in bytes.
    pub sectorsize: u32,
}

/// One logged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// First sector written on the device, in log sectors.
    pub sector: u64,
    /// Sectors written (or discarded).
    pub nr_sectors: u64,
    /// FLUSH | FUA | DISCARD | MARK | METADATA.
    pub flags: u64,
    /// A MARK's text.
    pub mark: Option<String>,
    /// Byte offset of the data in the log file (meaningful with data).
    pub data_offset: u64,
}

impl Entry {
    /// True when the entry carries data sectors in the log.
    pub fn has_data(&self) -> bool {
        self.flags & (DISCARD | MARK) == 0 && self.nr_sectors > 0
    }

    /// True at a point where a power cut is worth replaying: a FLUSH, a
    /// FUA write, or a MARK.
    pub fn is_point(&self) -> bool {
        self.flags & (FLUSH | FUA | MARK) != 0
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Parse the super block (the log's first bytes).
pub fn parse_super(b: &[u8]) -> Result<Super, String> {
    if b.len() < HEADER_BYTES - 4 {
        return Err(format!("super block: {} bytes, too short", b.len()));
    }
    let magic = u64_at(b, 0);
    if magic != MAGIC {
        return Err(format!(
            "super block: magic {magic:#x}, want {MAGIC:#x} (not a dm-log-writes log)"
        ));
    }
    let version = u64_at(b, 8);
    if version != VERSION {
        return Err(format!("super block: version {version}, want {VERSION}"));
    }
    let nr_entries = u64_at(b, 16);
    let sectorsize = u32::from_le_bytes(b[24..28].try_into().expect("4 bytes"));
    if !(512..=MAX_SECTOR_SIZE).contains(&sectorsize) || !sectorsize.is_power_of_two() {
        return Err(format!("super block: sector size {sectorsize}"));
    }
    Ok(Super {
        nr_entries,
        sectorsize,
    })
}

/// Parse one entry header sector; `data_offset` is filled in by the caller.
pub fn parse_entry(b: &[u8]) -> Result<Entry, String> {
    if b.len() < HEADER_BYTES {
        return Err(format!("entry header: {} bytes, too short", b.len()));
    }
    let flags = u64_at(b, 16);
    let known = FLUSH | FUA | DISCARD | MARK | METADATA;
    if flags & !known != 0 {
        return Err(format!("entry header: unknown flags {flags:#x}"));
    }
    let data_len = u64_at(b, 24);
    let mark = if flags & MARK != 0 {
        let end = HEADER_BYTES
            .checked_add(usize::try_from(data_len).map_err(|e| e.to_string())?)
            .filter(|&e| e <= b.len())
            .ok_or_else(|| format!("entry header: mark of {data_len} bytes overruns the sector"))?;
        Some(String::from_utf8_lossy(&b[HEADER_BYTES..end]).into_owned())
    } else {
        if data_len != 0 {
            // Inline data (DAX) is not produced by the block devices we log.
            return Err(format!("entry header: inline data of {data_len} bytes"));
        }
        None
    };
    Ok(Entry {
        sector: u64_at(b, 0),
        nr_sectors: u64_at(b, 8),
        flags,
        mark,
        data_offset: 0,
    })
}

/// A log file, its entries indexed.
pub struct Log {
    file: File,
    /// The super block.
    pub sup: Super,
    /// Every entry, in log order.
    pub entries: Vec<Entry>,
}

impl Log {
    /// Read the super block and every entry header of the log at `path`.
    pub fn open(path: &Path) -> Result<Log, String> {
        let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        let mut head = vec![0u8; 512];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| format!("reading the super block: {e}"))?;
        let sup = parse_super(&head)?;
        let ss = u64::from(sup.sectorsize);
        let mut sector = vec![0u8; sup.sectorsize as usize];
        let mut pos = ss;
        let mut entries = Vec::with_capacity(sup.nr_entries.min(1 << 20) as usize);
        for i in 0..sup.nr_entries {
            if pos + ss > len {
                return Err(format!(
                    "entry {i} of {} starts at byte {pos}, past the log's end ({len})",
                    sup.nr_entries
                ));
            }
            file.read_exact_at(&mut sector, pos)
                .map_err(|e| format!("reading entry {i}: {e}"))?;
            let mut e = parse_entry(&sector).map_err(|m| format!("entry {i}: {m}"))?;
            pos += ss;
            e.data_offset = pos;
            if e.has_data() {
                pos = e
                    .nr_sectors
                    .checked_mul(ss)
                    .and_then(|n| n.checked_add(pos))
                    .filter(|&p| p <= len)
                    .ok_or_else(|| {
                        format!("entry {i}: {} data sectors overrun the log", e.nr_sectors)
                    })?;
            }
            entries.push(e);
        }
        Ok(Log { file, sup, entries })
    }

    /// Apply entries `from..to` to `dev` (a copy of the device as it was
    /// when logging started): writes are written, discards zeroed, marks
    /// and flushes change nothing.
    pub fn replay(&self, dev: &File, from: usize, to: usize) -> std::io::Result<()> {
        let ss = u64::from(self.sup.sectorsize);
        let mut buf = Vec::new();
        for e in &self.entries[from..to] {
            if e.flags & MARK != 0 || e.nr_sectors == 0 {
                continue;
            }
            let bytes = usize::try_from(e.nr_sectors * ss).map_err(std::io::Error::other)?;
            buf.resize(bytes, 0);
            if e.flags & DISCARD != 0 {
                buf.fill(0);
            } else {
                self.file.read_exact_at(&mut buf, e.data_offset)?;
            }
            dev.write_all_at(&buf, e.sector * ss)?;
        }
        Ok(())
    }

    /// Index of every entry with a MARK, with its text.
    pub fn marks(&self) -> Vec<(usize, String)> {
        self.entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.mark.clone().map(|m| (i, m)))
            .collect()
    }
}

/// True when two files have the same bytes (the replay's self-check).
pub fn same_bytes(a: &Path, b: &Path) -> std::io::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Write a small synthetic log (for the parser's own tests): entries of
/// `(sector, flags, data sectors or mark text)`.
pub fn write_synthetic(path: &Path, ss: u32, entries: &[(u64, u64, SynthData)]) {
    let mut f = File::create(path).unwrap();
    let ssz = ss as usize;
    let mut sup = vec![0u8; ssz];
    sup[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    sup[8..16].copy_from_slice(&VERSION.to_le_bytes());
    sup[16..24].copy_from_slice(&(entries.len() as u64).to_le_bytes());
    sup[24..28].copy_from_slice(&ss.to_le_bytes());
    f.write_all(&sup).unwrap();
    for (sector, flags, data) in entries {
        let mut h = vec![0u8; ssz];
        h[0..8].copy_from_slice(&sector.to_le_bytes());
        h[16..24].copy_from_slice(&flags.to_le_bytes());
        match data {
            SynthData::Mark(t) => {
                h[24..32].copy_from_slice(&(t.len() as u64).to_le_bytes());
                h[32..32 + t.len()].copy_from_slice(t.as_bytes());
                f.write_all(&h).unwrap();
            }
            SynthData::Sectors(bytes) => {
                assert_eq!(bytes.len() % ssz, 0);
                h[8..16].copy_from_slice(&((bytes.len() / ssz) as u64).to_le_bytes());
                f.write_all(&h).unwrap();
                f.write_all(bytes).unwrap();
            }
            SynthData::Discard(n) => {
                h[8..16].copy_from_slice(&n.to_le_bytes());
                f.write_all(&h).unwrap();
            }
        }
    }
}

/// What a synthetic entry carries.
pub enum SynthData {
    /// A mark's text.
    Mark(String),
    /// Data sectors (a multiple of the sector size).
    Sectors(Vec<u8>),
    /// A discard of this many sectors.
    Discard(u64),
}
