//! Response bodies of `imageupd serve`: a small in-memory message, or a
//! section of a file streamed in [`CHUNK`]-sized frames, optionally
//! throttled, counted in the metrics while it is sent.
//!
//! A frame is read by a blocking task straight into the buffer that becomes
//! the frame (one copy, kernel to the frame). `tokio::fs::File` would copy
//! each chunk twice more (into its own buffer, then out of it), and on a
//! fleet rollout sending those bytes is nearly all the server does.

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

/// Bytes read from a file per body frame.
const CHUNK: usize = 256 * 1024;

/// A response body: a small message, nothing, or a file stream.
pub(super) enum ServeBody {
    /// A small in-memory body (None: empty, e.g. HEAD).
    Bytes(Option<Bytes>),
    /// A file section.
    File(FileBody),
}

/// Streams `remaining` bytes of a file in [`CHUNK`]-sized frames, optionally
/// throttled.
pub(super) struct FileBody {
    /// Read from its current offset by one blocking task at a time.
    file: Arc<std::fs::File>,
    remaining: u64,
    /// The frame being read, if any.
    reading: Option<JoinHandle<io::Result<Vec<u8>>>>,
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

impl FileBody {
    /// Send `count` bytes of `file` from its current offset.
    pub(super) fn new(
        file: std::fs::File,
        count: u64,
        throttle_bps: Option<u64>,
        metrics: Arc<metrics::ServeMetrics>,
    ) -> FileBody {
        FileBody {
            file: Arc::new(file),
            remaining: count,
            reading: None,
            throttle_bps,
            sleep: None,
            in_flight: None,
            metrics,
        }
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
        let reading = self.reading.get_or_insert_with(|| {
            let file = self.file.clone();
            let want = self.remaining.min(CHUNK as u64);
            tokio::task::spawn_blocking(move || {
                // `take` + `read_to_end` fills the spare capacity without
                // zeroing it first, and stops at `want`.
                let mut v = Vec::with_capacity(want as usize);
                (&*file).take(want).read_to_end(&mut v)?;
                Ok(v)
            })
        });
        let read = ready!(Pin::new(reading).poll(cx));
        self.reading = None;
        let chunk = match read {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.metrics.error();
                return Poll::Ready(Some(Err(e)));
            }
            Err(e) => {
                self.metrics.error();
                return Poll::Ready(Some(Err(io::Error::other(format!("file read task: {e}")))));
            }
        };
        let n = chunk.len();
        if n == 0 {
            self.metrics.error();
            return Poll::Ready(Some(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while being served",
            ))));
        }
        self.remaining -= n as u64;
        if let Some(bps) = self.throttle_bps {
            let d = Duration::from_secs_f64(n as f64 / bps as f64);
            self.sleep = Some(Box::pin(tokio::time::sleep(d)));
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }
}
