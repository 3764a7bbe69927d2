//! HTTP(S) sources: a store published by `imageupd serve` or any static web
//! server, CDN or bucket (SPEC §2, §3, §5 step 3).
//!
//! - The marker, manifests and signatures are small and fetched whole; the
//!   manifest is then verified exactly like a local store's
//!   ([`crate::format::trust::verify_stored`]).
//! - Objects are downloaded **before staging** ([`HttpStore::prefetch`]), in
//!   parallel ([`PARALLEL_DOWNLOADS`]) over one pooled client (keep-alive),
//!   into the download cache on the root's state directory:
//!
//!   ```text
//!   <root>/var/lib/imageupd/cache/objects/<aa>/<sha256>   verified zstd frames (store layout)
//!   <root>/var/lib/imageupd/cache/partial/<sha256>        downloads in progress
//!   ```
//!
//!   An object counts as present only once its decompressed bytes hashed
//!   to its digest; a partial download survives a failed or killed run and
//!   is resumed with a `Range` request. Staging then reads (and verifies
//!   again) from the cache. The cache is pruned to the current plan's
//!   objects when a prefetch starts, and removed once staging has copied
//!   everything onto the root (before the quiesce window; a run converging
//!   after a crash in the swap downloads again only what it still lacks).
//! - A node on the image the target was published from (`--parent`) first
//!   tries the target's update delta ([`crate::format::delta`], `fetch/delta.rs`): the
//!   manifest and the objects it needs from one static file, verified the
//!   same way; whatever the delta does not deliver goes the ways below.
//! - When the image has a signed pack index ([`crate::format::pack`]), objects it
//!   locates are fetched as coalesced byte ranges of packs instead, a few
//!   requests in all, into the same cache and verified the same way
//!   (`fetch/packed.rs`); the rest are fetched loose.
//! - Connect errors, timeouts, broken bodies, 408, 429 and 5xx are retried
//!   with exponential backoff ([`MAX_ATTEMPTS`], [`BACKOFF_INITIAL`],
//!   [`BACKOFF_MAX`]); other 4xx and TLS certificate failures are final.
//! - TLS trusts the system's roots plus an optional CA file.

use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::format::codec::max_compressed;
use crate::format::manifest::{Digest, MAX_MANIFEST_BYTES};
use crate::fs::fsx;
use crate::fs::store;
use crate::sys::error::ExitKind;
use crate::sys::progress::{Bar, Progress};

mod cache;
mod delta;
mod manifest;
mod packed;

use cache::Cache;

/// Attempts per request (the first try included) before giving up.
pub const MAX_ATTEMPTS: u32 = 10;
/// Delay before the first retry; it doubles per retry, ±25% jitter.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// Longest delay between two retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Time allowed to establish a connection (TCP + TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for response headers, and for each read of a body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Objects downloaded at once (each over a pooled keep-alive connection).
pub const PARALLEL_DOWNLOADS: usize = 8;
/// The download cache, relative to the state directory.
pub const CACHE_DIR: &str = "cache";
/// Largest marker file or signature accepted, in bytes.
const MAX_SMALL_BYTES: u64 = 64 * 1024;
/// Copy buffer for downloads, in bytes.
const BUF: usize = 128 * 1024;

/// Network settings of an HTTP(S) source.
#[derive(Clone, Debug, Default)]
pub struct NetOptions {
    /// Extra CA certificate(s) (PEM) trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The node's state directory: the stored manifests there let a new
    /// manifest be fetched frame by frame ([`crate::format::mframes`]), and the
    /// current one names the update delta to try ([`crate::format::delta`]).
    pub state_dir: Option<PathBuf>,
    /// The node's root: an update delta's patches read the current
    /// image's files there.
    pub root: Option<PathBuf>,
}

impl NetOptions {
    /// Settings for a node: `--ca-file` (a host path) wins over the config
    /// key `ca_file`, which names a path on the node and so is read below
    /// `root`.
    pub fn for_root(
        cli_ca_file: Option<&Path>,
        config_ca_file: Option<&Path>,
        root: &Path,
    ) -> NetOptions {
        let ca_file = cli_ca_file
            .map(Path::to_path_buf)
            .or_else(|| config_ca_file.map(|p| root.join(p.strip_prefix("/").unwrap_or(p))));
        NetOptions {
            ca_file,
            state_dir: Some(root.join(crate::fs::rootfs::STATE_DIR)),
            root: Some(root.to_path_buf()),
        }
    }
}

/// What the network side of an update did (`apply --json` → `download`).
#[derive(Serialize, Debug, Default, Clone)]
pub struct DownloadReport {
    /// The store URL.
    pub url: String,
    /// HTTP requests sent, retries included.
    pub requests: u64,
    /// Requests that were retries of a failed one.
    pub retries: u64,
    /// Response body bytes received (compressed objects, manifest, marker).
    pub bytes: u64,
    /// Objects downloaded and verified by this run.
    pub objects: u64,
    /// Objects found, verified, in the download cache from an earlier run.
    pub cached_objects: u64,
    /// Downloads continued with a `Range` request.
    pub resumed: u64,
    /// Wall time of the object downloads, in ms.
    pub ms: u64,
    /// Objects taken from packs (included in `objects`).
    pub packed_objects: u64,
    /// Range requests to packs (included in `requests`).
    pub pack_requests: u64,
    /// The image whose update delta gave the manifest (and objects), when
    /// one was used ([`crate::format::delta`]).
    pub delta: Option<String>,
    /// Objects taken from the update delta (included in `objects`).
    pub delta_objects: u64,
}

/// An HTTP status that ended a request.
#[derive(Debug, thiserror::Error)]
#[error("{url} answered HTTP {status}")]
pub struct StatusError {
    /// The URL requested.
    pub url: String,
    /// The status code.
    pub status: u16,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    retries: AtomicU64,
    bytes: AtomicU64,
    objects: AtomicU64,
    cached: AtomicU64,
    resumed: AtomicU64,
    ms: AtomicU64,
    packed: AtomicU64,
    pack_requests: AtomicU64,
    delta_objects: AtomicU64,
}

/// One attempt's failure: worth retrying or not.
enum Attempt {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

/// A store reached over HTTP(S).
pub struct HttpStore {
    base: reqwest::Url,
    client: reqwest::blocking::Client,
    counters: Counters,
    cache: OnceLock<Cache>,
    packs: OnceLock<packed::PackCtx>,
    state_dir: Option<PathBuf>,
    root_dir: Option<PathBuf>,
    delta: std::sync::Mutex<Option<delta::DeltaCtx>>,
    /// Set once the store's marker was checked (or a delta proved the
    /// store's format).
    store_ok: OnceLock<()>,
}

impl HttpStore {
    /// Connect to the store at `url` and check its marker and format.
    pub fn open(url: &str, opts: &NetOptions) -> Result<HttpStore> {
        let mut base = reqwest::Url::parse(url)
            .with_context(|| format!("invalid store URL {url:?}"))
            .context(ExitKind::Usage)?;
        if !matches!(base.scheme(), "http" | "https")
            || base.query().is_some()
            || base.fragment().is_some()
        {
            return Err(anyhow!(
                "store URL {url:?} must be plain http:// or https:// without query or fragment"
            ))
            .context(ExitKind::Usage);
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let mut b = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(READ_TIMEOUT)
            .pool_max_idle_per_host(PARALLEL_DOWNLOADS)
            .user_agent(concat!("imageupd/", env!("CARGO_PKG_VERSION")))
            .http1_only();
        if let Some(ca) = &opts.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading CA file {}", ca.display()))
                .context(ExitKind::Usage)?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("CA file {} holds no valid PEM certificate", ca.display()))
                .context(ExitKind::Usage)?;
            if certs.is_empty() {
                return Err(anyhow!("CA file {} holds no certificate", ca.display()))
                    .context(ExitKind::Usage);
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let client = b.build().context("setting up the HTTP client")?;
        let h = HttpStore {
            base,
            client,
            counters: Counters::default(),
            cache: OnceLock::new(),
            packs: OnceLock::new(),
            state_dir: opts.state_dir.clone(),
            root_dir: opts.root.clone(),
            delta: std::sync::Mutex::new(None),
            store_ok: OnceLock::new(),
        };
        // A node that may update through a delta checks the marker only
        // when it needs more than the delta (so a small update is one
        // request); the delta's own magic and version prove the format.
        let delta_possible = opts.state_dir.as_ref().is_some_and(|d| {
            d.join(std::str::from_utf8(crate::fs::rootfs::CURRENT_MANIFEST).unwrap_or("-"))
                .is_file()
        });
        if !delta_possible {
            h.check_marker()?;
        }
        Ok(h)
    }

    /// Check the store's marker and format (once).
    fn check_marker(&self) -> Result<()> {
        if self.store_ok.get().is_some() {
            return Ok(());
        }
        let h = self;
        let marker = h
            .get_small(store::MARKER, MAX_SMALL_BYTES)
            .with_context(|| format!("{} is not a reachable imageupd store", h.url()))?;
        let format = serde_json::from_slice::<serde_json::Value>(&marker)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_u64()))
            .ok_or_else(|| {
                anyhow!(
                    "{}{} is not an imageupd store marker",
                    h.url(),
                    store::MARKER
                )
            })
            .context(ExitKind::Source)?;
        if format != u64::from(store::STORE_FORMAT) {
            return Err(anyhow!(
                "store {} has format {format} but this imageupd reads format {}",
                h.url(),
                store::STORE_FORMAT
            ))
            .context(ExitKind::Source);
        }
        let _ = self.store_ok.set(());
        Ok(())
    }

    /// The store's base URL (ends with `/`).
    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    fn join(&self, rel: &str) -> Result<reqwest::Url> {
        self.base
            .join(rel)
            .with_context(|| format!("building the URL of {rel}"))
    }

    /// Stored manifest bytes and signature (None when the store has none)
    /// of image `id`. Not verified: see [`crate::format::trust::verify_stored`].
    pub fn read_manifest_raw(&self, id: &str) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        crate::format::manifest::validate_image_id(id)
            .map_err(anyhow::Error::msg)
            .context(ExitKind::Usage)?;
        self.check_marker()?;
        let m = format!("images/{id}/{}", store::MANIFEST_NAME);
        let by_frames = self.manifest_by_frames(id);
        let stored = by_frames
            .map(Ok)
            .unwrap_or_else(|| self.get_small(&m, MAX_MANIFEST_BYTES))
            .map_err(|e| {
                if is_status(&e, &[404, 410]) {
                    e.context(format!(
                        "image {id:?} is not in the store at {}",
                        self.url()
                    ))
                } else {
                    e.context(format!("fetching the manifest of image {id:?}"))
                }
            })?;
        // S3-style servers answer 403 for a missing key; without a signature
        // the manifest is refused anyway unless unsigned images are allowed.
        let sig = match self.get_small(&format!("images/{id}/{}", store::SIG_NAME), MAX_SMALL_BYTES)
        {
            Ok(s) => Some(s),
            Err(e) if is_status(&e, &[403, 404, 410]) => None,
            Err(e) => return Err(e.context(format!("fetching the signature of image {id:?}"))),
        };
        Ok((stored, sig))
    }

    /// A small file, whole, with retries; at most `limit` bytes.
    fn get_small(&self, rel: &str, limit: u64) -> Result<Vec<u8>> {
        let url = self.join(rel)?;
        self.retrying(&url, || {
            let resp = self.send(&url, None)?;
            let mut body = Vec::new();
            let mut r = CountingReader {
                inner: resp,
                counter: &self.counters.bytes,
            };
            match (&mut r).take(limit + 1).read_to_end(&mut body) {
                Ok(_) if body.len() as u64 > limit => Err(Attempt::Fatal(anyhow!(
                    "{url} is larger than {limit} bytes"
                ))),
                Ok(_) => Ok(body),
                Err(e) => Err(Attempt::Retry(anyhow!(e).context(format!("reading {url}")))),
            }
        })
    }

    /// Send one GET (from byte `from` on, if given). Success and 416 are
    /// returned; everything else is classified for [`Self::retrying`].
    fn send(
        &self,
        url: &reqwest::Url,
        from: Option<u64>,
    ) -> Result<reqwest::blocking::Response, Attempt> {
        self.send_range(url, from.map(|off| format!("bytes={off}-")))
    }

    /// [`Self::send`] with any `Range` header value.
    fn send_range(
        &self,
        url: &reqwest::Url,
        range: Option<String>,
    ) -> Result<reqwest::blocking::Response, Attempt> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let mut rb = self.client.get(url.clone());
        if let Some(r) = range {
            rb = rb.header(reqwest::header::RANGE, r);
        }
        let resp = match rb.send() {
            Ok(r) => r,
            Err(e) if e.is_builder() || e.is_redirect() || is_tls_failure(&e) => {
                return Err(Attempt::Fatal(
                    anyhow!(e).context(format!("requesting {url}")),
                ))
            }
            Err(e) => {
                return Err(Attempt::Retry(
                    anyhow!(e).context(format!("requesting {url}")),
                ))
            }
        };
        let s = resp.status();
        if s.is_success() || s == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            return Ok(resp);
        }
        let err = anyhow!(StatusError {
            url: url.to_string(),
            status: s.as_u16()
        });
        if s == reqwest::StatusCode::REQUEST_TIMEOUT
            || s == reqwest::StatusCode::TOO_MANY_REQUESTS
            || s.is_server_error()
        {
            Err(Attempt::Retry(err))
        } else {
            Err(Attempt::Fatal(err))
        }
    }

    /// Run `f` until it succeeds, fails for good, or [`MAX_ATTEMPTS`] are spent.
    fn retrying<T>(
        &self,
        url: &reqwest::Url,
        mut f: impl FnMut() -> Result<T, Attempt>,
    ) -> Result<T> {
        let mut delay = BACKOFF_INITIAL;
        let mut attempt = 1;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Attempt::Fatal(e)) if e.downcast_ref::<ExitKind>().is_some() => return Err(e),
                Err(Attempt::Fatal(e)) => return Err(e).context(ExitKind::Source),
                Err(Attempt::Retry(e)) if attempt >= MAX_ATTEMPTS => {
                    return Err(e)
                        .with_context(|| {
                            format!("giving up on {url} after {MAX_ATTEMPTS} attempts")
                        })
                        .context(ExitKind::Source)
                }
                Err(Attempt::Retry(e)) => {
                    let d = jitter(delay);
                    tracing::warn!(
                        "{e:#}; retrying in {d:.1?} (attempt {}/{MAX_ATTEMPTS})",
                        attempt + 1
                    );
                    std::thread::sleep(d);
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    delay = (delay * 2).min(BACKOFF_MAX);
                    attempt += 1;
                }
            }
        }
    }

    fn object_url(&self, d: &Digest) -> Result<reqwest::Url> {
        self.join(&store::object_rel(d))
    }

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
        let bar = progress.bar("download", total);
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
    fn cached(&self, cache: &Cache, d: &Digest, size: u64, bar: &Bar) -> Result<bool> {
        let Ok(f) = cache.open(d) else {
            return Ok(false);
        };
        match cache.verify(&f, d, size) {
            Ok(()) => {
                self.counters.cached.fetch_add(1, Ordering::Relaxed);
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

    fn fetch_object(&self, cache: &Cache, d: &Digest, size: u64, bar: &Bar) -> Result<()> {
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
    fn download_part(
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
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match resp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Attempt::Retry(anyhow!(e).context(format!(
                        "download of {url} broke off after {have} bytes"
                    ))))
                }
            };
            have += n as u64;
            self.counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
            if have > limit {
                let _ = f.set_len(0);
                return Err(Attempt::Fatal(
                    anyhow!("{url} is larger than any zstd frame of {size} bytes can be ({limit}); refused").context(ExitKind::Untrusted),
                ));
            }
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

    /// Read the content of an object: from the download cache after a
    /// prefetch, else streamed from the store (unverified; the caller
    /// verifies).
    pub fn open_content(&self, d: &Digest) -> io::Result<Box<dyn Read + Send + '_>> {
        if let Some(c) = self.cache.get() {
            match c.open(d) {
                Ok(f) => return Ok(Box::new(zstd::stream::read::Decoder::new(f)?)),
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
        Ok(Box::new(zstd::stream::read::Decoder::new(
            CountingReader {
                inner: resp,
                counter: &self.counters.bytes,
            },
        )?))
    }

    /// The counters so far.
    pub fn report(&self) -> DownloadReport {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DownloadReport {
            url: self.url().to_string(),
            requests: g(&c.requests),
            retries: g(&c.retries),
            bytes: g(&c.bytes),
            objects: g(&c.objects),
            cached_objects: g(&c.cached),
            resumed: g(&c.resumed),
            ms: g(&c.ms),
            packed_objects: g(&c.packed),
            pack_requests: g(&c.pack_requests),
            delta: self
                .delta
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|c| c.from().to_string()),
            delta_objects: g(&c.delta_objects),
        }
    }
}

/// Remove the download cache below the state directory `state` (once
/// staging has copied its objects onto the root).
pub fn drop_cache(state: BorrowedFd<'_>) -> Result<u64> {
    let dev = match fsx::stat_at(state, CACHE_DIR.as_bytes()) {
        Ok(st) => st.dev,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).context("looking at the download cache"),
    };
    fsx::remove_tree_at(state, CACHE_DIR.as_bytes(), dev).context("removing the download cache")
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::getrandom(&mut b).is_ok() {
        u16::from_le_bytes(b)
    } else {
        32768
    };
    // Factor in [0.75, 1.25).
    d.mul_f64(0.75 + f64::from(r) / 131072.0)
}

fn is_status(e: &anyhow::Error, codes: &[u16]) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<StatusError>()
            .is_some_and(|s| codes.contains(&s.status))
    })
}

/// A certificate or handshake failure: retrying cannot help. (rustls
/// errors arrive wrapped in `io::Error`s, whose `source()` skips the
/// wrapped error, so those are unwrapped with `get_ref()`.)
fn is_tls_failure(e: &reqwest::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if s.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        src = match s.downcast_ref::<io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => s.source(),
        };
    }
    false
}

/// Counts bytes read into an atomic counter.
struct CountingReader<'a, R> {
    inner: R,
    counter: &'a AtomicU64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// True when `from` names an HTTP(S) store.
pub fn is_url(from: &str) -> bool {
    from.starts_with("http://") || from.starts_with("https://")
}

#[cfg(test)]
mod tests;
