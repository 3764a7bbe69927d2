//! Response bodies of `imageupd serve`: a small in-memory message, or a
//! section of a file streamed in [`CHUNK`]-sized frames, optionally
//! throttled, counted in the metrics while it is sent.
//!
//! A file frame is read on the blocking pool straight into the buffer that
//! becomes the frame (no intermediate copy, no zero-fill), one read per
//! [`CHUNK`]: serving is mostly this loop, so its copies and thread
//! hand-offs are the publisher's CPU per node.

use std::future::Future;
use std::io::{self, Read};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::task::JoinHandle;

use super::metrics;

/// Bytes read from a file per body frame (1 MiB: large enough that the
/// per-frame hand-off to the blocking pool is noise, small enough to keep a
/// slow client's memory bounded).
const CHUNK: usize = 1024 * 1024;
/// Bytes per frame under `--throttle` (the granularity throttled tests and
/// slow-link rehearsals were written against).
const THROTTLED_CHUNK: usize = 256 * 1024;

/// A response body: a small message, nothing, or a file stream.
pub(super) enum ServeBody {
    /// A small in-memory body (None: empty, e.g. HEAD).
    Bytes(Option<Bytes>),
    /// A file section.
    File(FileBody),
}

/// A read of the next frame on the blocking pool; it hands the file back.
type PendingRead = JoinHandle<(std::fs::File, io::Result<Vec<u8>>)>;

/// Streams `remaining` bytes of a file in [`CHUNK`]-sized frames, optionally
/// throttled.
pub(super) struct FileBody {
    /// The file, positioned at the next byte to send (None while a read
    /// holds it).
    file: Option<std::fs::File>,
    pending: Option<PendingRead>,
    remaining: u64,
    throttle_bps: Option<u64>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Counts the request in flight while the body is being sent.
    pub(super) in_flight: Option<metrics::InFlight>,
    metrics: Arc<metrics::ServeMetrics>,
}

impl http_body::Body for ServeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ServeBody::Bytes(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ServeBody::File(f) => f.poll_chunk(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ServeBody::Bytes(b) => b.is_none(),
            ServeBody::File(f) => f.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ServeBody::Bytes(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ServeBody::File(f) => SizeHint::with_exact(f.remaining),
        }
    }
}

/// Read up to `want` bytes from the file's position.
fn read_frame(mut file: std::fs::File, want: usize) -> (std::fs::File, io::Result<Vec<u8>>) {
    let mut buf = Vec::with_capacity(want);
    let res = (&mut file).take(want as u64).read_to_end(&mut buf);
    (file, res.map(|_| buf))
}

impl FileBody {
    /// Send `count` bytes of `file` from its current offset.
    pub(super) fn new(
        file: std::fs::File,
        count: u64,
        throttle_bps: Option<u64>,
        metrics: Arc<metrics::ServeMetrics>,
    ) -> FileBody {
        FileBody {
            file: Some(file),
            pending: None,
            remaining: count,
            throttle_bps,
            sleep: None,
            in_flight: None,
            metrics,
        }
    }

    fn fail(&self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.metrics.error();
        Poll::Ready(Some(Err(e)))
    }

    fn poll_chunk(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if let Some(s) = &mut self.sleep {
            ready!(s.as_mut().poll(cx));
            self.sleep = None;
        }
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        if self.pending.is_none() {
            let Some(file) = self.file.take() else {
                return self.fail(io::Error::other("file body polled after an error"));
            };
            let chunk = if self.throttle_bps.is_some() {
                THROTTLED_CHUNK
            } else {
                CHUNK
            };
            let want = self.remaining.min(chunk as u64) as usize;
            self.pending = Some(tokio::task::spawn_blocking(move || read_frame(file, want)));
        }
        let Some(pending) = self.pending.as_mut() else {
            return self.fail(io::Error::other("no read in flight"));
        };
        let joined = ready!(Pin::new(pending).poll(cx));
        self.pending = None;
        let buf = match joined {
            Ok((file, Ok(buf))) => {
                self.file = Some(file);
                buf
            }
            Ok((_, Err(e))) => return self.fail(e),
            Err(e) => return self.fail(io::Error::other(format!("file read task: {e}"))),
        };
        if buf.is_empty() {
            return self.fail(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being served",
            ));
        }
        self.remaining -= buf.len() as u64;
        if let Some(bps) = self.throttle_bps {
            let d = Duration::from_secs_f64(buf.len() as f64 / bps as f64);
            self.sleep = Some(Box::pin(tokio::time::sleep(d)));
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
    }
}
