//! Loose objects: downloading what a plan needs into the download cache
//! (in parallel, resumed and retried), and reading an object's content
//! from the cache or straight from the store.

use super::body::{body_error, BodyError};
use super::cache::Cache;
use super::{Attempt, HttpStore, BUF, PARALLEL_DOWNLOADS};
use crate::format::codec::max_compressed;
use crate::format::manifest::Digest;
use crate::format::stream::CappedReader;
use crate::sys::error::ExitKind;
use crate::sys::progress::{Bar, Progress};
use anyhow::{anyhow, Context, Result};
use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

impl HttpStore {
    /// Download every object of `fetch` (digest, content size in bytes) not
    /// yet in the download cache below `state` (the state directory), in
    /// parallel, verifying each. Afterwards [`Self::open_content`] reads
    /// from the cache.
    pub fn prefetch(
        &self,
        fetch: &[(Digest, u64)],
        state: BorrowedFd<'_>,
        progress: &Progress,
    ) -> Result<()> {
        let t0 = Instant::now();
        let cache = Cache::create(state).context("opening the download cache")?;
        let keep: HashSet<Digest> = fetch.iter().map(|(d, _)| *d).collect();
        let pruned = cache.prune(&keep).context("pruning the download cache")?;
        if pruned > 0 {
            tracing::info!("removed {pruned} stale entries from the download cache");
        }
        let total: u64 = fetch.iter().map(|(_, s)| *s).sum();
        let bar = progress.bar_objects("download", total, fetch.len() as u64);
        let res = self
            .prefetch_delta(&cache, fetch, &bar)
            .and_then(|rest| self.prefetch_packed(&cache, &rest, &bar))
            .and_then(|loose| {
                crate::sys::par::par_map(&loose, PARALLEL_DOWNLOADS, |(d, size)| {
                    self.fetch_object(&cache, d, *size, &bar)
                })
            });
        bar.finish();
        self.counters
            .ms
            .fetch_add(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        res?;
        let _ = self.cache.set(cache);
        Ok(())
    }

    /// True (counted and shown as progress) when the download cache holds
    /// `d` intact already; a damaged copy is removed.
    pub(super) fn cached(&self, cache: &Cache, d: &Digest, size: u64, bar: &Bar) -> Result<bool> {
        let Ok((f, kept)) = cache.open(d) else {
            return Ok(false);
        };
        match cache.verify_kept(&f, kept, d, size) {
            Ok(()) => {
                self.counters.cached.fetch_add(1, Ordering::Relaxed);
                bar.object();
                bar.inc(size);
                Ok(true)
            }
            Err(e) => {
                tracing::warn!("cached object {d} is damaged ({e:#}); downloading it again");
                cache.remove(d)?;
                Ok(false)
            }
        }
    }

    pub(super) fn fetch_object(
        &self,
        cache: &Cache,
        d: &Digest,
        size: u64,
        bar: &Bar,
    ) -> Result<()> {
        if self.cached(cache, d, size, bar)? {
            return Ok(());
        }
        let url = self.object_url(d)?;
        let limit = max_compressed(size);
        let mut shown = 0u64;
        let mut fresh = false;
        loop {
            let resumed = self
                .retrying(&url, || {
                    self.download_part(cache, d, &url, limit, size, bar, &mut shown)
                })
                .with_context(|| {
                    format!(
                        "downloading object {d} ({size} bytes) from the store at {}",
                        self.url()
                    )
                })?;
            let part = cache
                .open_part(d, false)
                .with_context(|| format!("reopening the download of {d}"))?;
            match cache.verify(&part, d, size) {
                Ok(()) => {
                    cache
                        .commit(d)
                        .with_context(|| format!("moving object {d} into the download cache"))?;
                    self.counters.objects.fetch_add(1, Ordering::Relaxed);
                    bar.object();
                    bar.inc(size.saturating_sub(shown));
                    return Ok(());
                }
                Err(e) => {
                    cache.remove_part(d)?;
                    if resumed && !fresh {
                        // The earlier part may be stale: once more from scratch.
                        tracing::warn!("resumed download of {d} failed verification ({e:#}); downloading it whole");
                        fresh = true;
                        continue;
                    }
                    return Err(e)
                        .with_context(|| format!("object {d} from {url} does not match its digest; refused (nothing of it reached the root)"))
                        .context(ExitKind::Untrusted);
                }
            }
        }
    }

    /// One attempt at completing `partial/<digest>`; returns whether it
    /// continued an earlier partial download.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn download_part(
        &self,
        cache: &Cache,
        d: &Digest,
        url: &reqwest::Url,
        limit: u64,
        size: u64,
        bar: &Bar,
        shown: &mut u64,
    ) -> Result<bool, Attempt> {
        let fatal = |e: io::Error, what: &str| {
            Attempt::Fatal(anyhow!(e).context(format!("{what} the download cache")))
        };
        let mut f = cache
            .open_part(d, true)
            .map_err(|e| fatal(e, "writing to"))?;
        let mut have = f.metadata().map_err(|e| fatal(e, "reading"))?.len();
        if have > limit {
            f.set_len(0).map_err(|e| fatal(e, "writing to"))?;
            have = 0;
        }
        let mut resp = self.send(url, (have > 0).then_some(have))?;
        let mut resumed = false;
        match resp.status().as_u16() {
            206 if have > 0 => {
                let cr = resp
                    .headers()
                    .get(reqwest::header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !cr.starts_with(&format!("bytes {have}-")) {
                    f.set_len(0).map_err(|e| fatal(e, "writing to"))?;
                    return Err(Attempt::Retry(anyhow!(
                        "{url}: asked for bytes {have}- but got range {cr:?}; restarting it"
                    )));
                }
                resumed = true;
                self.counters.resumed.fetch_add(1, Ordering::Relaxed);
            }
            // Our part already holds every byte; verification decides.
            416 if have > 0 => return Ok(true),
            200 => {
                f.set_len(0).map_err(|e| fatal(e, "writing to"))?;
                have = 0;
            }
            s => return Err(Attempt::Fatal(anyhow!("{url}: unexpected HTTP {s}"))),
        }
        f.seek(SeekFrom::Start(have))
            .map_err(|e| fatal(e, "writing to"))?;
        let expect = have + resp.content_length().unwrap_or(0);
        // The body may bring the part up to `limit` bytes, not one more.
        let mut body = self.body(&mut resp, limit - have);
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(body_error(&e), Some(BodyError::TooLong { .. })) => {
                    f.set_len(0).map_err(|e| fatal(e, "writing to"))?;
                    return Err(Attempt::Fatal(
                        anyhow!("{url} is larger than any zstd frame of {size} bytes can be ({limit}); refused").context(ExitKind::Untrusted),
                    ));
                }
                Err(e) => {
                    return Err(Attempt::Retry(anyhow!(e).context(format!(
                        "download of {url} broke off after {have} bytes"
                    ))))
                }
            };
            have += n as u64;
            f.write_all(&buf[..n]).map_err(|e| fatal(e, "writing to"))?;
            // Progress in content bytes, scaled by how much of the body arrived.
            if expect > 0 {
                let target =
                    (u128::from(have.min(expect)) * u128::from(size) / u128::from(expect)) as u64;
                if target > *shown {
                    bar.inc(target - *shown);
                    *shown = target;
                }
            }
        }
        Ok(resumed)
    }

    /// Link the download cache's plain copy of `d` into `dir` as `name`
    /// (unverified: the caller verifies what it linked); `false` when there
    /// is none to link (see `Cache::link_raw`).
    pub fn link_content(&self, d: &Digest, dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<bool> {
        match self.cache.get() {
            Some(c) => c.link_raw(d, dir, name),
            None => Ok(false),
        }
    }

    /// Read the content of an object of `size` bytes: from the download
    /// cache after a prefetch, else streamed from the store (unverified;
    /// the caller verifies). More than `size` bytes is an error.
    pub fn open_content(&self, d: &Digest, size: u64) -> io::Result<Box<dyn Read + Send + '_>> {
        if let Some(c) = self.cache.get() {
            match c.open(d) {
                Ok((f, kept)) => return Cache::content(f, kept, size),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let url = self.object_url(d).map_err(io::Error::other)?;
        let resp = match self.send(&url, None) {
            Ok(r) if r.status() == reqwest::StatusCode::OK => r,
            Ok(r) => {
                return Err(io::Error::other(format!(
                    "{url}: unexpected HTTP {}",
                    r.status()
                )))
            }
            Err(Attempt::Retry(e) | Attempt::Fatal(e)) => {
                return Err(io::Error::other(format!("{e:#}")))
            }
        };
        Ok(Box::new(CappedReader::new(
            zstd::stream::read::Decoder::new(self.body(resp, max_compressed(size)))?,
            size,
        )))
    }
}
