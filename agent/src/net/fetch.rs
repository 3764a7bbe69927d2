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
//!   <root>/var/lib/imageupd/cache/raw/<aa>/<sha256>       verified plain contents
//!   <root>/var/lib/imageupd/cache/partial/<sha256>        downloads in progress
//!   ```
//!
//!   An object counts as present only once its decompressed bytes hashed
//!   to its digest; a partial download survives a failed or killed run and
//!   is resumed with a `Range` request. Objects that arrive decompressed
//!   anyway (from packs, from a delta) are kept plain. Staging then reads
//!   (and verifies again) from the cache; a plain copy on the root's
//!   filesystem is linked into staging instead of copied, so a first
//!   install writes each byte once. The cache is pruned to the current plan's
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
//! - Every response is read through a [`body::Body`]: a byte cap (the
//!   marker and signatures [`MAX_SMALL_BYTES`], the manifest and pack index
//!   by `[fetch]` keys, an object by its declared size, pack spans and
//!   delta ranges by their signed index and header), a low-speed abort and
//!   a per-request deadline ([`crate::net::limits`]). A longer body is
//!   refused (exit 4), never truncated; a slow one is retried.
//! - A published whole-disk image is streamed in order, one GET continued
//!   by checked range requests when it breaks (`fetch/stream.rs`).
//! - TLS trusts the system's roots plus an optional CA file.

use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::format::manifest::Digest;
use crate::fs::fsx;
use crate::fs::store;
use crate::sys::error::ExitKind;

pub mod body;
mod cache;
mod delta;
mod loose;
mod manifest;
mod packed;
mod stream;

use body::{Body, BodyError, Pace};
use cache::Cache;

use crate::net::limits::FetchLimits;

/// Attempts per request (the first try included) before giving up.
pub const MAX_ATTEMPTS: u32 = 10;
/// Delay before the first retry; it doubles per retry, ±25% jitter.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// Longest delay between two retries.
pub const BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Time allowed to establish a connection (TCP + TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Objects downloaded at once (each over a pooled keep-alive connection).
pub const PARALLEL_DOWNLOADS: usize = 8;
/// The download cache, relative to the state directory.
pub const CACHE_DIR: &str = "cache";
/// Largest marker file or signature accepted, in bytes.
pub const MAX_SMALL_BYTES: u64 = 64 * 1024;
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
    /// Caps, low-speed abort and deadline of every request (`[fetch]`).
    pub limits: FetchLimits,
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
            limits: FetchLimits::default(),
        }
    }
}

/// What the network side of an update did (`apply --json` → `download`).
#[derive(Serialize, serde::Deserialize, Debug, Default, Clone, PartialEq, Eq)]
#[serde(default)]
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
    limits: FetchLimits,
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
            // In the blocking client this bounds the wait for the headers
            // and for each read, so a silent server is caught by the
            // low-speed window even when no byte arrives at all.
            .timeout(Duration::from_secs(opts.limits.low_speed_secs))
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
            limits: opts.limits.clone(),
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
            .unwrap_or_else(|| self.get_small(&m, self.limits.max_manifest_bytes))
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

    /// A trust-metadata file (see [`crate::net::source::Source::trust_file`]);
    /// `None` on 403/404/410.
    pub fn trust_file(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        let cap = crate::format::tuf::envelope::MAX_ENVELOPE_BYTES as u64;
        match self.get_small(rel, cap) {
            Ok(b) => Ok(Some(b)),
            Err(e) if is_status(&e, &[403, 404, 410]) => Ok(None),
            Err(e) => Err(e.context(format!("fetching {rel} from {}", self.url()))),
        }
    }

    /// A small file, whole, with retries; at most `limit` bytes.
    fn get_small(&self, rel: &str, limit: u64) -> Result<Vec<u8>> {
        let url = self.join(rel)?;
        self.retrying(&url, || {
            let resp = self.send(&url, None)?;
            let mut body = Vec::new();
            match self.body(resp, limit).read_to_end(&mut body) {
                Ok(_) => Ok(body),
                Err(e) => Err(read_failed(e, &url)),
            }
        })
    }

    /// The body of `resp`, bounded to `cap` bytes and by the `[fetch]`
    /// pace, counted into the report.
    fn body<R: Read>(&self, resp: R, cap: u64) -> Body<'_, R> {
        Body::new(
            resp,
            cap,
            Pace::from(&self.limits),
            std::time::Instant::now(),
            &self.counters.bytes,
        )
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

/// A failed read of the body of `url`: a body longer than allowed is
/// untrusted input (final); a stall, a deadline or a broken connection is
/// worth a retry.
fn read_failed(e: io::Error, url: &reqwest::Url) -> Attempt {
    let too_long = matches!(body::body_error(&e), Some(BodyError::TooLong { .. }));
    let e = anyhow!(e).context(format!("reading {url}"));
    if too_long {
        Attempt::Fatal(e.context(ExitKind::Untrusted))
    } else {
        Attempt::Retry(e)
    }
}

/// True when `from` names an HTTP(S) store.
pub fn is_url(from: &str) -> bool {
    from.starts_with("http://") || from.starts_with("https://")
}

#[cfg(test)]
mod tests;
