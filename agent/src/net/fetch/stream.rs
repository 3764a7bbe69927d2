//! One large file of a store streamed in order (a published whole-disk
//! image for `provision --whole-disk`): a single GET answered 200 with the
//! size the signed manifest declares, read through a [`Body`] capped at that
//! size; a body that breaks off is continued with `Range: bytes=N-`, which
//! must be answered 206 with a `Content-Range` starting at N (anything else
//! ends the stream: the digest, checked by the caller over every byte in
//! order, would catch a spliced stream anyway, but a silent restart would
//! duplicate bytes).

use std::io::{self, Read};

use anyhow::{anyhow, Context, Result};
use reqwest::blocking::Response;
use reqwest::StatusCode;

use super::body::{body_error, Body, BodyError};
use super::{is_status, Attempt, HttpStore, MAX_ATTEMPTS};
use crate::sys::error::ExitKind;

impl HttpStore {
    /// Stream `rel`, a file of exactly `size` bytes (unverified: the caller
    /// hashes what it reads). More bytes than `size` are an error, fewer
    /// show as an early end.
    pub fn open_stream(&self, rel: &str, size: u64) -> Result<Box<dyn Read + Send + '_>> {
        self.check_marker()?;
        let url = self.join(rel)?;
        let resp = self
            .retrying(&url, || {
                let r = self.send(&url, None)?;
                if r.status() != StatusCode::OK {
                    return Err(Attempt::Fatal(anyhow!(
                        "{url} answered HTTP {} to a plain GET",
                        r.status()
                    )));
                }
                match r.content_length() {
                    Some(n) if n != size => Err(Attempt::Fatal(
                        anyhow!("{url} is {n} bytes long, the signed manifest says {size}")
                            .context(ExitKind::Untrusted),
                    )),
                    _ => Ok(r),
                }
            })
            .map_err(|e| {
                if is_status(&e, &[403, 404, 410]) {
                    e.context(format!("the store at {} does not serve {rel}", self.url()))
                } else {
                    e
                }
            })?;
        Ok(Box::new(Resuming {
            store: self,
            url,
            size,
            got: 0,
            resumes: 0,
            body: Some(self.body(resp, size)),
        }))
    }
}

/// The body of one stream, continued with range requests when it breaks.
struct Resuming<'a> {
    store: &'a HttpStore,
    url: reqwest::Url,
    size: u64,
    /// Bytes delivered so far.
    got: u64,
    /// Range requests made so far.
    resumes: u32,
    body: Option<Body<'a, Response>>,
}

impl Resuming<'_> {
    /// Continue at byte `self.got`: 206 with a matching `Content-Range` only.
    fn resume(&mut self) -> io::Result<()> {
        self.resumes += 1;
        let url = &self.url;
        let resp = match self.store.send(url, Some(self.got)) {
            Ok(r) => r,
            Err(Attempt::Retry(e) | Attempt::Fatal(e)) => {
                return Err(io::Error::other(format!("{e:#}")))
            }
        };
        let want = format!("bytes {}-{}/{}", self.got, self.size - 1, self.size);
        let range = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if resp.status() != StatusCode::PARTIAL_CONTENT || range != want {
            return Err(io::Error::other(format!(
                "{url} answered {} with Content-Range {range:?} to a range request for {want:?}; not continuing",
                resp.status()
            )));
        }
        self.store
            .counters
            .resumed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.body = Some(self.store.body(resp, self.size - self.got));
        Ok(())
    }
}

impl Read for Resuming<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(b) = self.body.as_mut() else {
                return Ok(0);
            };
            match b.read(buf) {
                Ok(n) => {
                    self.got += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(body_error(&e), Some(BodyError::TooLong { .. })) => {
                    return Err(e)
                }
                Err(e) if self.resumes + 1 < MAX_ATTEMPTS && self.got < self.size => {
                    tracing::warn!(
                        "{} broke off after {} bytes ({e}); continuing with a range request",
                        self.url,
                        self.got
                    );
                    std::thread::sleep(super::jitter(super::BACKOFF_INITIAL));
                    self.body = None;
                    self.resume()
                        .with_context(|| format!("continuing {}", self.url))
                        .map_err(io::Error::other)?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
