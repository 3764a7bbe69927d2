//! `imageupd serve`: the embedded publisher HTTP(S) server (SPEC §9).
//!
//! It serves a store directory read-only, exactly as any static web server
//! could, with the guarantees nodes, caches and Ironic rely on:
//!
//! - GET answers exactly 200 with `Content-Length` (IPA accepts nothing
//!   else); HEAD answers with `Content-Length` and `Last-Modified` (Ironic's
//!   conductor); a single byte range is honoured (206 + `Content-Range`, 416
//!   when unsatisfiable), which resumes interrupted downloads.
//! - `objects/`, `packs/` and `images/` are immutable (`Cache-Control: public,
//!   max-age=31536000, immutable`); everything else (`index.json`, the
//!   marker, `disks/`) must be revalidated (`no-cache`).
//! - Only `imageupd-store.json`, `index.json`, `objects/`, `packs/`,
//!   `images/` and `disks/` are served. A path with `..`, `.`, an empty component, a
//!   percent-encoded slash, backslash or NUL is refused with 400; files are
//!   opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` below the
//!   pinned store descriptor, so a symlink anywhere in the path (even one
//!   inside the store pointing out of it) yields 404, never content.
//! - Bodies are streamed from the open file, never read wholly into memory.
//! - SIGTERM or SIGINT stop accepting, let responses in flight finish (up to
//!   [`SHUTDOWN_GRACE`]) and exit 0.
//!
//! Every response is logged at info level (target `imageupd::access`) and
//! counted in the server's metrics ([`metrics`]), served at `/metrics` on
//! the same listener, or only on `--metrics-listen` when that is given.

use std::convert::Infallible;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::format::manifest::RelPath;
use crate::fs::fsx;
use crate::fs::store::Store;

mod body;
pub mod metrics;
pub mod request;
use body::{FileBody, ServeBody};
pub use request::{parse_range, resolve_path, CacheClass, PathRefusal, RangeSpec};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
/// How long responses in flight may take to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Time a client has to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `Cache-Control` of content named by digest or by immutable image id.
pub const CACHE_IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// `Cache-Control` of everything that may change (index, marker, disks/).
pub const CACHE_REVALIDATE: &str = "no-cache";

/// What `imageupd serve` was asked to do.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The store directory.
    pub store: PathBuf,
    /// Address to listen on (`host:port`; port 0 picks a free one).
    pub listen: String,
    /// PEM certificate chain for HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    pub tls_key: Option<PathBuf>,
    /// Send each response body at most this fast, in bytes per second
    /// (simulates a slow link in tests and demos).
    pub throttle_bps: Option<u64>,
    /// Serve `/metrics` on this address (plain HTTP) instead of on
    /// `listen`.
    pub metrics_listen: Option<String>,
}

/// The path the metrics are served at.
pub const METRICS_PATH: &str = "/metrics";

/// Shared server state.
struct State {
    store: OwnedFd,
    throttle_bps: Option<u64>,
    metrics: Arc<metrics::ServeMetrics>,
    /// `/metrics` is answered on the store's listener.
    metrics_here: bool,
}

/// Run the server until SIGTERM/SIGINT. Prints `listening on URL` on stdout
/// once the socket is bound.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    let store = Store::open(&opts.store)?;
    let fd = fsx::open_dir(store.path())
        .with_context(|| format!("opening store {}", store.path().display()))?;
    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        (None, None) => None,
        _ => bail!("--tls-cert and --tls-key go together"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(run(
        opts,
        State {
            store: fd,
            throttle_bps: opts.throttle_bps.filter(|&b| b > 0),
            metrics: Arc::default(),
            metrics_here: opts.metrics_listen.is_none(),
        },
        tls,
    ))
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading TLS certificates from {}", cert.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading TLS private key from {}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not form a usable pair")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

async fn run(
    opts: &ServeOptions,
    state: State,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<()> {
    let listener = TcpListener::bind(&opts.listen)
        .await
        .with_context(|| format!("listening on {}", opts.listen))?;
    let local = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let state = Arc::new(state);
    // `--metrics-listen`: its own listener, named on the same first line
    // of stdout (scripts and tests read one line).
    let mut metrics_at = String::new();
    if let Some(addr) = &opts.metrics_listen {
        let ml = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr} for metrics"))?;
        metrics_at = format!(", metrics on http://{}{METRICS_PATH}", ml.local_addr()?);
        tokio::spawn(serve_metrics(ml, state.metrics.clone()));
    }
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "listening on {scheme}://{local}/ serving {}{metrics_at}",
            opts.store.display()
        )?;
        out.flush()?;
    }
    tracing::info!(
        "serving {} on {scheme}://{local}/{metrics_at}",
        opts.store.display()
    );
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing SIGINT handler")?;
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // E.g. EMFILE: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
        };
        // Headers and body go out in separate writes: without NODELAY,
        // Nagle plus delayed ACKs stall every small response by ~40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY for {peer}: {e}");
        }
        let st = state.clone();
        let svc = service_fn(move |req| handle(st.clone(), peer, req));
        let http = http.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let res = match tls {
                None => {
                    watcher
                        .watch(http.serve_connection(TokioIo::new(tcp), svc))
                        .await
                }
                Some(acc) => match acc.accept(tcp).await {
                    Ok(s) => {
                        watcher
                            .watch(http.serve_connection(TokioIo::new(s), svc))
                            .await
                    }
                    Err(e) => {
                        tracing::info!("TLS handshake with {peer} failed: {e}");
                        return;
                    }
                },
            };
            if let Err(e) = res {
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; exiting anyway"),
    }
    Ok(())
}

/// The metrics' own listener: `/metrics` and nothing else, plain HTTP.
/// Ends with the runtime when the server shuts down.
async fn serve_metrics(listener: TcpListener, m: Arc<metrics::ServeMetrics>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let m = m.clone();
        let http = http.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let r = if req.uri().path() == METRICS_PATH {
                    metrics_response(&m)
                } else {
                    plain(StatusCode::NOT_FOUND, "only /metrics here")
                };
                async move { Ok::<_, Infallible>(r) }
            });
            if let Err(e) = http.serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!("metrics connection from {peer}: {e}");
            }
        });
    }
}

fn metrics_response(m: &metrics::ServeMetrics) -> Response<ServeBody> {
    let mut r = Response::new(ServeBody::Bytes(Some(Bytes::from(m.render()))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::sys::metrics::CONTENT_TYPE),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_REVALIDATE),
    );
    r
}

async fn handle(
    state: Arc<State>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ServeBody>, Infallible> {
    let t0 = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if state.metrics_here && path == METRICS_PATH && method == Method::GET {
        return Ok(metrics_response(&state.metrics));
    }
    let guard = state.metrics.begin();
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut resp = respond(&state, &method, &path, req.headers()).await;
    state.metrics.answered(
        &path,
        resp.status().as_u16(),
        http_body::Body::size_hint(resp.body()).exact().unwrap_or(0),
    );
    if let ServeBody::File(f) = resp.body_mut() {
        // In flight until the body is sent (or the client goes away).
        f.in_flight = Some(guard);
    }
    tracing::info!(
        target: "imageupd::access",
        "{peer} \"{method} {path}\" {} {} range={} {}ms",
        resp.status().as_u16(),
        resp.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).unwrap_or("-"),
        range.as_deref().unwrap_or("-"),
        t0.elapsed().as_millis()
    );
    Ok(resp)
}

fn plain(status: StatusCode, msg: &str) -> Response<ServeBody> {
    let mut r = Response::new(ServeBody::Bytes(Some(Bytes::from(format!("{msg}\n")))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(CACHE_REVALIDATE),
    );
    r
}

/// An opened file ready to be served.
/// Files up to this many bytes are read whole by the blocking task that
/// opens them, in bytes: one thread hop per request instead of one more per
/// read (most loose objects are a few KiB).
const INLINE_MAX: u64 = 256 * 1024;

struct Opened {
    file: std::fs::File,
    len: u64,
    mtime: SystemTime,
    /// The whole content, for a small file read at once.
    inline: Option<Bytes>,
}

fn open_served(store: &OwnedFd, rel: &RelPath, inline_ok: bool) -> io::Result<Opened> {
    let mut file = fsx::open_file_beneath(store.as_fd(), rel)?;
    let md = file.metadata()?;
    let len = md.len();
    let mut inline = None;
    if inline_ok && len <= INLINE_MAX {
        let mut v = Vec::with_capacity(len as usize);
        (&file).take(INLINE_MAX + 1).read_to_end(&mut v)?;
        if v.len() as u64 == len {
            inline = Some(Bytes::from(v));
        } else {
            // Changed under us (stores are immutable; be safe anyway):
            // stream what is there from the start.
            file.seek(SeekFrom::Start(0))?;
        }
    }
    Ok(Opened {
        len,
        mtime: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        file,
        inline,
    })
}

async fn respond(
    state: &Arc<State>,
    method: &Method,
    raw: &str,
    headers: &HeaderMap,
) -> Response<ServeBody> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let (rel, class) = match resolve_path(raw) {
        Ok(v) => v,
        Err(PathRefusal::Bad(why)) => {
            return plain(StatusCode::BAD_REQUEST, &format!("bad path: {why}"))
        }
        Err(PathRefusal::NotFound) => return plain(StatusCode::NOT_FOUND, "not found"),
    };
    let st = state.clone();
    let inline_ok = method == Method::GET && state.throttle_bps.is_none();
    let opened =
        match tokio::task::spawn_blocking(move || open_served(&st.store, &rel, inline_ok)).await {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => {
                // ENOENT, a symlink (ELOOP), an escape (EXDEV), a directory or
                // anything not a regular file: all the same to a client.
                tracing::debug!("{raw}: {e}");
                return plain(StatusCode::NOT_FOUND, "not found");
            }
            Err(e) => {
                tracing::error!("{raw}: {e}");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
            }
        };
    let len = opened.len;
    let last_modified = httpdate::fmt_http_date(opened.mtime);
    let mtime_s = opened
        .mtime
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let etag = format!("\"{len:x}-{mtime_s:x}\"");
    let mut builder = Response::builder()
        .header(header::LAST_MODIFIED, &last_modified)
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(
            header::CACHE_CONTROL,
            if class == CacheClass::Immutable {
                CACHE_IMMUTABLE
            } else {
                CACHE_REVALIDATE
            },
        )
        .header(
            header::CONTENT_TYPE,
            if raw.ends_with(".json") {
                "application/json"
            } else {
                "application/octet-stream"
            },
        );
    if not_modified(headers, &etag, opened.mtime) {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(ServeBody::Bytes(None))
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"));
    }
    let mut spec = RangeSpec::Full;
    if method == Method::GET {
        if let Some(r) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
            let if_range_ok = match headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
                None => true,
                Some(v) => v == etag || v == last_modified,
            };
            if if_range_ok {
                spec = parse_range(r, len);
            }
        }
    }
    let (status, start, count) = match spec {
        RangeSpec::Full => (StatusCode::OK, 0, len),
        RangeSpec::Part { start, end } => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeSpec::Unsatisfiable => {
            let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    builder = builder.status(status).header(header::CONTENT_LENGTH, count);
    let body = if method == Method::HEAD {
        ServeBody::Bytes(None)
    } else if let Some(b) = &opened.inline {
        ServeBody::Bytes(Some(b.slice(start as usize..(start + count) as usize)))
    } else {
        let mut file = opened.file;
        if start > 0 {
            if let Err(e) = file.seek(SeekFrom::Start(start)) {
                tracing::error!("{raw}: seek: {e}");
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
            }
        }
        ServeBody::File(FileBody::new(
            file,
            count,
            state.throttle_bps,
            state.metrics.clone(),
        ))
    };
    builder
        .body(body)
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))
}

/// `If-None-Match` (preferred) or `If-Modified-Since` says the client's copy is current.
fn not_modified(headers: &HeaderMap, etag: &str, mtime: SystemTime) -> bool {
    if let Some(inm) = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        return inm.split(',').any(|t| t.trim() == etag || t.trim() == "*");
    }
    if let Some(ims) = headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
    {
        if let Ok(since) = httpdate::parse_http_date(ims) {
            let secs = |t: SystemTime| {
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            };
            return secs(mtime) <= secs(since);
        }
    }
    false
}

#[cfg(test)]
mod tests;
