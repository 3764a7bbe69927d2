//! A response body with bounds ([`Body`]): a byte cap that is an error
//! rather than a truncation, a low-speed abort and a per-request deadline
//! ([`crate::net::limits`]); it also counts the bytes into the download
//! report. Every response of [`super::HttpStore`] is read through one.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::net::limits::FetchLimits;

/// Why a [`Body`] stopped (inside the `io::Error` its read returns).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// More bytes than the request may have: untrusted, not retried.
    #[error("the body is longer than the {cap} bytes allowed; refused")]
    TooLong {
        /// The cap, in bytes.
        cap: u64,
    },
    /// Too slow: worth a retry.
    #[error("only {got} bytes arrived in {secs} s (at least {want} required); aborted")]
    Stalled {
        /// Bytes received in the window.
        got: u64,
        /// Bytes required per window.
        want: u64,
        /// The window, in seconds.
        secs: u64,
    },
    /// Over the per-request deadline: worth a retry.
    #[error("the request took longer than its deadline of {secs} s; aborted")]
    Deadline {
        /// The deadline, in seconds.
        secs: u64,
    },
}

/// The [`BodyError`] inside `e`, if that is what it is.
pub fn body_error(e: &io::Error) -> Option<&BodyError> {
    e.get_ref().and_then(|i| i.downcast_ref::<BodyError>())
}

/// The speed and time rules of a [`Body`], from [`FetchLimits`].
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// Bytes required per window.
    pub low_speed_bytes: u64,
    /// The window.
    pub window: Duration,
    /// The whole request's deadline.
    pub deadline: Duration,
}

impl From<&FetchLimits> for Pace {
    fn from(l: &FetchLimits) -> Pace {
        Pace {
            low_speed_bytes: l.low_speed_bytes,
            window: Duration::from_secs(l.low_speed_secs),
            deadline: Duration::from_secs(l.deadline_secs),
        }
    }
}

/// A bounded body: at most `cap` bytes (one more is a
/// [`BodyError::TooLong`]), at least [`Pace::low_speed_bytes`] per
/// [`Pace::window`], done within [`Pace::deadline`] of its start.
pub struct Body<'a, R> {
    inner: R,
    counter: &'a AtomicU64,
    cap: u64,
    got: u64,
    pace: Pace,
    started: Instant,
    window_start: Instant,
    window_got: u64,
}

impl<'a, R: Read> Body<'a, R> {
    /// Bound `inner` (a request sent at `started`), counting into `counter`.
    pub fn new(inner: R, cap: u64, pace: Pace, started: Instant, counter: &'a AtomicU64) -> Self {
        Body {
            inner,
            counter,
            cap,
            got: 0,
            pace,
            started,
            window_start: Instant::now(),
            window_got: 0,
        }
    }

    /// After the last wanted byte: the body must end here (a longer one is
    /// a [`BodyError::TooLong`], also when `cap` was not reached).
    pub fn expect_end(&mut self) -> io::Result<()> {
        let mut b = [0u8; 1];
        loop {
            match self.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => return Err(io::Error::other(BodyError::TooLong { cap: self.got - 1 })),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn check_time(&mut self, now: Instant) -> Result<(), BodyError> {
        if now.duration_since(self.started) > self.pace.deadline {
            return Err(BodyError::Deadline {
                secs: self.pace.deadline.as_secs(),
            });
        }
        if now.duration_since(self.window_start) >= self.pace.window {
            if self.window_got < self.pace.low_speed_bytes {
                return Err(BodyError::Stalled {
                    got: self.window_got,
                    want: self.pace.low_speed_bytes,
                    secs: self.pace.window.as_secs(),
                });
            }
            self.window_start = now;
            self.window_got = 0;
        }
        Ok(())
    }
}

impl<R: Read> Read for Body<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.check_time(Instant::now()).map_err(io::Error::other)?;
        // Never ask for more than one byte past the cap: that one byte is
        // enough to know the body is too long.
        let room = usize::try_from((self.cap - self.got.min(self.cap)).saturating_add(1))
            .unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.got += n as u64;
        self.window_got += n as u64;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        if self.got > self.cap {
            return Err(io::Error::other(BodyError::TooLong { cap: self.cap }));
        }
        // A trickle that keeps each read short is caught here too (not only
        // by the client's per-read timeout).
        self.check_time(Instant::now()).map_err(io::Error::other)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(bytes: u64, window_ms: u64, deadline_ms: u64) -> Pace {
        Pace {
            low_speed_bytes: bytes,
            window: Duration::from_millis(window_ms),
            deadline: Duration::from_millis(deadline_ms),
        }
    }

    #[test]
    fn cap_is_an_error_not_a_truncation() {
        let c = AtomicU64::new(0);
        let data = [7u8; 100];
        let mut b = Body::new(&data[..], 99, pace(0, 60_000, 60_000), Instant::now(), &c);
        let mut out = Vec::new();
        let e = b.read_to_end(&mut out).unwrap_err();
        assert_eq!(body_error(&e), Some(&BodyError::TooLong { cap: 99 }));
        // Exactly the cap is fine.
        let mut b = Body::new(&data[..], 100, pace(0, 60_000, 60_000), Instant::now(), &c);
        let mut out = Vec::new();
        assert_eq!(b.read_to_end(&mut out).unwrap(), 100);
        b.expect_end().unwrap();
        // Under the cap, but more than wanted.
        let mut b = Body::new(&data[..], 1000, pace(0, 60_000, 60_000), Instant::now(), &c);
        let mut first = [0u8; 10];
        b.read_exact(&mut first).unwrap();
        assert!(body_error(&b.expect_end().unwrap_err()).is_some());
        assert_eq!(c.load(Ordering::Relaxed), 100 + 100 + 11);
    }

    /// One byte per read, 20 ms apart.
    struct Trickle(u32);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 || buf.is_empty() {
                return Ok(0);
            }
            std::thread::sleep(Duration::from_millis(20));
            self.0 -= 1;
            buf[0] = 1;
            Ok(1)
        }
    }

    #[test]
    fn trickle_is_stalled_and_deadline_ends_a_steady_body() {
        let c = AtomicU64::new(0);
        let mut b = Body::new(
            Trickle(1000),
            1 << 20,
            pace(100, 200, 60_000),
            Instant::now(),
            &c,
        );
        let e = b.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(
            matches!(body_error(&e), Some(BodyError::Stalled { want: 100, .. })),
            "{e}"
        );
        // Fast enough per window, but longer than the deadline.
        let mut b = Body::new(
            Trickle(1000),
            1 << 20,
            pace(1, 100, 300),
            Instant::now(),
            &c,
        );
        let e = b.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(
            matches!(body_error(&e), Some(BodyError::Deadline { .. })),
            "{e}"
        );
        // And a body that keeps up passes.
        let mut b = Body::new(
            Trickle(10),
            1 << 20,
            pace(1, 100, 60_000),
            Instant::now(),
            &c,
        );
        assert_eq!(b.read_to_end(&mut Vec::new()).unwrap(), 10);
    }
}
