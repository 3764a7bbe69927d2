//! Response bodies of `imageupd serve`: a small in-memory message, or a
//! section of a file streamed in [`CHUNK`]-sized frames, optionally
//! throttled, counted in the metrics while it is sent.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context as TaskContext, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, ReadBuf};

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
    file: tokio::fs::File,
    remaining: u64,
    buf: Vec<u8>,
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
        file: tokio::fs::File,
        count: u64,
        throttle_bps: Option<u64>,
        metrics: Arc<metrics::ServeMetrics>,
    ) -> FileBody {
        FileBody {
            file,
            remaining: count,
            buf: vec![0; CHUNK.min(count as usize)],
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
        let want = (self.remaining.min(self.buf.len() as u64)) as usize;
        let mut rb = ReadBuf::new(&mut self.buf[..want]);
        if let Err(e) = ready!(Pin::new(&mut self.file).poll_read(cx, &mut rb)) {
            self.metrics.error();
            return Poll::Ready(Some(Err(e)));
        }
        let n = rb.filled().len();
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
        Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(rb.filled())))))
    }
}
