//! The bytes a fanotify group initialised with `FAN_REPORT_DFID_NAME`
//! hands to `read(2)`, parsed without I/O (fanotify(7)).
//!
//! Each event is a fixed `fanotify_event_metadata` header followed by
//! information records; the one this agent asks for names the directory
//! the event happened in by file handle, and the entry by name (`.` when
//! the event is on the directory itself).

/// `FANOTIFY_METADATA_VERSION` of the kernel ABI this parser reads.
pub const METADATA_VERSION: u8 = 3;
/// Size in bytes of `struct fanotify_event_metadata`.
pub const METADATA_LEN: usize = 24;
/// `FAN_Q_OVERFLOW`: the kernel dropped events.
pub const Q_OVERFLOW: u64 = 0x0000_4000;
/// `FAN_EVENT_INFO_TYPE_FID`.
const INFO_FID: u8 = 1;
/// `FAN_EVENT_INFO_TYPE_DFID_NAME`.
const INFO_DFID_NAME: u8 = 2;
/// `FAN_EVENT_INFO_TYPE_DFID`.
const INFO_DFID: u8 = 3;
/// Size in bytes of an information record's header plus its `fsid`.
const INFO_FID_HEAD: usize = 4 + 8;
/// Size in bytes of `struct file_handle` before its handle bytes.
const HANDLE_HEAD: usize = 8;
/// `MAX_HANDLE_SZ`: the largest file handle the kernel makes, in bytes.
pub const MAX_HANDLE_BYTES: usize = 128;

/// A kernel file handle: names an inode of one filesystem stably, whatever
/// its path (`open_by_handle_at(2)` turns it back into a descriptor).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle {
    /// The filesystem's id (`statfs`'s `f_fsid`).
    pub fsid: [u8; 8],
    /// The handle's type, as the filesystem chose it.
    pub htype: i32,
    /// The opaque handle.
    pub bytes: Vec<u8>,
}

/// One event as the kernel reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The `FAN_*` bits of what happened.
    pub mask: u64,
    /// The event's file descriptor (`FAN_NOFD`, -1, in the reporting mode
    /// used here; any other value is a descriptor the caller must close).
    pub fd: i32,
    /// The process that caused it.
    pub pid: i32,
    /// The directory the event happened in (or on).
    pub dir: Option<Handle>,
    /// The entry's name in it; `.` for the directory itself.
    pub name: Option<Vec<u8>>,
}

impl Event {
    /// True when the kernel lost events before this one.
    pub fn overflowed(&self) -> bool {
        self.mask & Q_OVERFLOW != 0
    }
}

/// What is wrong with a buffer the kernel handed over.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// A length field points outside the buffer or below a header's size.
    #[error("fanotify event at byte {at} is truncated or has a bad length")]
    Truncated {
        /// Offset of the bad event in the buffer.
        at: usize,
    },
    /// A kernel ABI this parser does not know.
    #[error("fanotify metadata version {0} is not supported (expected {METADATA_VERSION})")]
    Version(u8),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parse every event in `buf` (what one `read` returned).
pub fn parse(buf: &[u8]) -> Result<Vec<Event>, EventError> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < buf.len() {
        let bad = EventError::Truncated { at };
        let ev = buf.get(at..).ok_or(EventError::Truncated { at })?;
        let len = u32_at(ev, 0).ok_or(EventError::Truncated { at })? as usize;
        let vers = *ev.get(4).ok_or(EventError::Truncated { at })?;
        if vers != METADATA_VERSION {
            return Err(EventError::Version(vers));
        }
        let meta_len = u16_at(ev, 6).ok_or(EventError::Truncated { at })? as usize;
        if len < METADATA_LEN || meta_len < METADATA_LEN || meta_len > len || len > ev.len() {
            return Err(bad);
        }
        let ev = &ev[..len];
        let mask = u64_at(ev, 8).ok_or(EventError::Truncated { at })?;
        let fd = u32_at(ev, 16).ok_or(EventError::Truncated { at })? as i32;
        let pid = u32_at(ev, 20).ok_or(EventError::Truncated { at })? as i32;
        let mut e = Event {
            mask,
            fd,
            pid,
            dir: None,
            name: None,
        };
        info_records(&ev[meta_len..], &mut e).ok_or(bad)?;
        out.push(e);
        at += len;
    }
    Ok(out)
}

/// Read the information records of one event into `e`; `None` when one
/// is malformed.
fn info_records(mut recs: &[u8], e: &mut Event) -> Option<()> {
    while !recs.is_empty() {
        let kind = *recs.first()?;
        let len = u16_at(recs, 2)? as usize;
        if len < 4 || len > recs.len() {
            return None;
        }
        let rec = &recs[..len];
        if matches!(kind, INFO_FID | INFO_DFID_NAME | INFO_DFID) {
            let fsid: [u8; 8] = rec.get(4..12)?.try_into().ok()?;
            let hbytes = u32_at(rec, INFO_FID_HEAD)? as usize;
            if hbytes > MAX_HANDLE_BYTES {
                return None;
            }
            let htype = u32_at(rec, INFO_FID_HEAD + 4)? as i32;
            let start = INFO_FID_HEAD + HANDLE_HEAD;
            let bytes = rec.get(start..start + hbytes)?.to_vec();
            if kind == INFO_DFID_NAME {
                let tail = &rec[start + hbytes..];
                let end = tail.iter().position(|&b| b == 0)?;
                e.name = Some(tail[..end].to_vec());
            }
            // An object's own FID (FAN_REPORT_FID) is not the directory.
            if kind != INFO_FID {
                e.dir = Some(Handle { fsid, htype, bytes });
            }
        }
        recs = &recs[len..];
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event as the kernel lays it out: metadata, then a DFID_NAME
    /// record padded to 4 bytes.
    pub(crate) fn event(mask: u64, handle: &[u8], name: Option<&[u8]>) -> Vec<u8> {
        let mut rec = vec![
            if name.is_some() {
                INFO_DFID_NAME
            } else {
                INFO_DFID
            },
            0,
            0,
            0,
        ];
        rec.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        rec.extend_from_slice(&(handle.len() as u32).to_ne_bytes());
        rec.extend_from_slice(&1i32.to_ne_bytes());
        rec.extend_from_slice(handle);
        if let Some(n) = name {
            rec.extend_from_slice(n);
            rec.push(0);
        }
        while rec.len() % 4 != 0 {
            rec.push(0);
        }
        let rl = rec.len() as u16;
        rec[2..4].copy_from_slice(&rl.to_ne_bytes());
        let mut ev = Vec::new();
        ev.extend_from_slice(&((METADATA_LEN + rec.len()) as u32).to_ne_bytes());
        ev.push(METADATA_VERSION);
        ev.push(0);
        ev.extend_from_slice(&(METADATA_LEN as u16).to_ne_bytes());
        ev.extend_from_slice(&mask.to_ne_bytes());
        ev.extend_from_slice(&(-1i32).to_ne_bytes());
        ev.extend_from_slice(&42i32.to_ne_bytes());
        ev.extend_from_slice(&rec);
        ev
    }

    #[test]
    fn parses_directory_handles_and_names() {
        let mut buf = event(0x100, b"HANDLE01", Some(b"driver.py"));
        buf.extend(event(0x4 | 0x4000_0000, b"H2", Some(b".")));
        let evs = parse(&buf).unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0].mask, 0x100);
        assert_eq!(evs[0].fd, -1);
        assert_eq!(evs[0].pid, 42);
        let d = evs[0].dir.as_ref().unwrap();
        assert_eq!(d.bytes, b"HANDLE01");
        assert_eq!(d.htype, 1);
        assert_eq!(d.fsid, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(evs[0].name.as_deref(), Some(&b"driver.py"[..]));
        assert_eq!(evs[1].name.as_deref(), Some(&b"."[..]));
        assert!(!evs[1].overflowed());
    }

    #[test]
    fn an_overflow_carries_no_record() {
        let mut ev = event(Q_OVERFLOW, b"", None);
        ev.truncate(METADATA_LEN);
        ev[0..4].copy_from_slice(&(METADATA_LEN as u32).to_ne_bytes());
        let evs = parse(&ev).unwrap();
        assert!(evs[0].overflowed());
        assert_eq!(evs[0].dir, None);
    }

    #[test]
    fn refuses_bad_lengths_and_versions() {
        let good = event(0x2, b"abc", Some(b"x"));
        for cut in 1..good.len() {
            assert!(parse(&good[..cut]).is_err(), "cut at {cut} was accepted");
        }
        let mut v = good.clone();
        v[4] = 2;
        assert_eq!(parse(&v), Err(EventError::Version(2)));
        let mut l = good.clone();
        l[0..4].copy_from_slice(&10u32.to_ne_bytes());
        assert!(parse(&l).is_err());
        // A record claiming more handle bytes than it holds.
        let mut h = good.clone();
        h[METADATA_LEN + 12..METADATA_LEN + 16].copy_from_slice(&100u32.to_ne_bytes());
        assert!(parse(&h).is_err());
        // A name without its terminating NUL.
        let mut n = event(0x2, b"abcd", Some(b"xyz"));
        let last = n.len() - 1;
        n[last] = b'q';
        assert!(parse(&n).is_err());
    }
}
