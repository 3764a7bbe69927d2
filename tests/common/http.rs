//! HTTP for the tests, apart from `imageupd serve` itself ([`super::serve`]):
//!
//! * [`FileServer`]: the one HTTP test server, a minimal keep-alive
//!   HTTP/1.1 file server over a directory, run in the test process. By
//!   default it never honours Range (every GET gets the whole file, 200);
//!   [`FileServerOptions::ranges`] makes it answer a single `bytes=` range
//!   with 206. It answers HEAD with the headers only, sends Last-Modified,
//!   counts the requests for each path and, when asked, fails the first
//!   request for chosen paths with a status of the test's choosing, or
//!   answers chosen requests with a hostile body ([`Fault`]: endless,
//!   trickled a byte a second, or cut off half-way);
//! * [`Nginx`]: a stock nginx serving a directory;
//! * [`raw`]: a request written by hand over TCP, so no client normalises
//!   the target first;
//! * [`free_port`].

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a server may take to come up.
pub const STARTUP: Duration = Duration::from_secs(20);

/// A loopback port free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// For the first request of a path: `Some(status line)` to fail it with,
/// `None` to serve it.
type FailFirst = fn(&str) -> Option<&'static str>;

/// A hostile answer to one request ([`FileServerOptions::fault`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Serve it properly.
    None,
    /// The right status (and Content-Range) and the right bytes, then zeros
    /// without end: no Content-Length, `Connection: close`.
    Endless,
    /// The right headers, then the body at one byte a second.
    Trickle,
    /// The right headers, then the first half of the body, then the
    /// connection closed (a transfer that broke off).
    Cut,
}

/// For a request (path, how many times it was asked for so far, 1 = the
/// first): the [`Fault`] to answer it with.
type FaultRule = fn(&str, u32) -> Fault;

/// What a [`FileServer`] will do; [`FileServer::over`] makes one.
pub struct FileServerOptions {
    dir: PathBuf,
    fail_first: FailFirst,
    ranges: bool,
    fault: FaultRule,
}

impl FileServerOptions {
    /// Answer the first request for each path with the status RULE gives
    /// it (an empty body), if any; later requests get the file.
    pub fn fail_first(mut self, rule: FailFirst) -> FileServerOptions {
        self.fail_first = rule;
        self
    }

    /// Honour a single `Range: bytes=A-B` / `bytes=A-` (206, or 416 past
    /// the end), as a static web server does.
    pub fn ranges(mut self) -> FileServerOptions {
        self.ranges = true;
        self
    }

    /// Answer the requests RULE picks with a hostile body.
    pub fn fault(mut self, rule: FaultRule) -> FileServerOptions {
        self.fault = rule;
        self
    }

    /// Listen on an ephemeral loopback port.
    pub fn start(self) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let behave = Behaviour {
            fail_first: self.fail_first,
            ranges: self.ranges,
            fault: self.fault,
        };
        let dir = self.dir;
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (dir, seen) = (dir.clone(), seen2.clone());
                std::thread::spawn(move || serve_connection(conn, &dir, &seen, behave));
            }
        });
        FileServer {
            url: format!("http://{addr}/"),
            addr,
            seen,
            stop,
        }
    }
}

/// A [`FileServer`] running in this process; it stops listening when
/// dropped.
pub struct FileServer {
    /// Base URL, ending in `/`.
    pub url: String,
    /// Listening address.
    pub addr: SocketAddr,
    seen: Arc<Mutex<HashMap<String, u32>>>,
    stop: Arc<AtomicBool>,
}

impl FileServer {
    /// A server for the files below DIR that serves every request.
    pub fn over(dir: &Path) -> FileServerOptions {
        FileServerOptions {
            dir: dir.to_path_buf(),
            fail_first: |_| None,
            ranges: false,
            fault: |_, _| Fault::None,
        }
    }

    /// How many requests each path has had so far.
    pub fn requests(&self) -> MutexGuard<'_, HashMap<String, u32>> {
        self.seen.lock().expect("lock")
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// How a [`FileServer`] answers.
#[derive(Clone, Copy)]
struct Behaviour {
    fail_first: FailFirst,
    ranges: bool,
    fault: FaultRule,
}

/// A single `bytes=A-B` / `bytes=A-` range of a LEN-byte file, if VALUE is
/// one: `Ok((start, end_inclusive))`, or `Err(())` past the end.
fn single_range(value: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    let start: u64 = a.trim().parse().ok()?;
    let end = match b.trim() {
        "" => len.saturating_sub(1),
        b => b.parse::<u64>().ok()?.min(len.saturating_sub(1)),
    };
    if start >= len || end < start {
        return Some(Err(()));
    }
    Some(Ok((start, end)))
}

/// Answer requests on CONN until the client closes it.
fn serve_connection(
    conn: TcpStream,
    dir: &Path,
    seen: &Mutex<HashMap<String, u32>>,
    behave: Behaviour,
) {
    let mut w = conn.try_clone().expect("clone stream");
    let mut r = BufReader::new(conn);
    loop {
        let mut first = String::new();
        if r.read_line(&mut first).unwrap_or(0) == 0 {
            return;
        }
        let mut range: Option<String> = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.trim().eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        let mut words = first.split_whitespace();
        let method = words.next().unwrap_or("GET").to_string();
        let path = words.next().unwrap_or("/").to_string();
        let n = {
            let mut g = seen.lock().expect("lock");
            let c = g.entry(path.clone()).or_insert(0);
            *c += 1;
            *c
        };
        let flake = if n > 1 {
            None
        } else {
            (behave.fail_first)(&path)
        };
        let rel = path.split('?').next().unwrap_or("").trim_start_matches('/');
        let file = dir.join(rel);
        let confined = !rel.split('/').any(|c| c == "..");
        let (mut status, mut body, modified) = match (flake, confined) {
            (Some(st), _) => (st, Vec::new(), None),
            (None, false) => ("404 Not Found", Vec::new(), None),
            (None, true) => match std::fs::read(&file) {
                Ok(b) => (
                    "200 OK",
                    b,
                    std::fs::metadata(&file).and_then(|m| m.modified()).ok(),
                ),
                Err(_) => ("404 Not Found", Vec::new(), None),
            },
        };
        let mut content_range = None;
        if behave.ranges && status == "200 OK" {
            let len = body.len() as u64;
            match range.as_deref().and_then(|v| single_range(v, len)) {
                Some(Ok((a, b))) => {
                    body = body[a as usize..=b as usize].to_vec();
                    status = "206 Partial Content";
                    content_range = Some(format!("bytes {a}-{b}/{len}"));
                }
                Some(Err(())) => {
                    body = Vec::new();
                    status = "416 Range Not Satisfiable";
                    content_range = Some(format!("bytes */{len}"));
                }
                None => {}
            }
        }
        let fault = if status.starts_with('2') {
            (behave.fault)(&path, n)
        } else {
            Fault::None
        };
        let mut head = format!("HTTP/1.1 {status}\r\n");
        if fault == Fault::Endless {
            head.push_str("Connection: close\r\n");
        } else {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if let Some(cr) = content_range {
            head.push_str(&format!("Content-Range: {cr}\r\n"));
        }
        if let Some(t) = modified {
            head.push_str(&format!(
                "Last-Modified: {}\r\n",
                httpdate::fmt_http_date(t)
            ));
        }
        head.push_str("\r\n");
        let body: &[u8] = if method == "HEAD" { &[] } else { &body };
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
        match fault {
            Fault::None => {
                if w.write_all(body).is_err() {
                    return;
                }
            }
            Fault::Endless => {
                // Until the client gives up and closes the connection.
                let zeros = vec![0u8; 64 * 1024];
                if w.write_all(body).is_err() {
                    return;
                }
                while w.write_all(&zeros).is_ok() {}
                return;
            }
            Fault::Cut => {
                let _ = w.write_all(&body[..body.len() / 2]);
                return;
            }
            Fault::Trickle => {
                for b in body {
                    if w.write_all(std::slice::from_ref(b)).is_err() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// nginx.

/// A stock nginx serving a directory on loopback (`daemon off`, killed when
/// dropped).
pub struct Nginx {
    child: Child,
    pub url: String,
    dir: PathBuf,
}

impl Nginx {
    #[track_caller]
    pub fn start(root: &Path, dir: &Path) -> Nginx {
        std::fs::create_dir_all(dir.join("tmp")).expect("nginx dir");
        let port = free_port();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 128; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n\
             fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n\
             default_type application/octet-stream;\n  sendfile on;\n  keepalive_requests 10000;\n\
             server {{\n    listen 127.0.0.1:{port};\n    root {};\n    disable_symlinks on;\n  }}\n}}\n",
            root.display()
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new("nginx")
            .arg("-e")
            .arg(dir.join("startup.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log")).expect("nginx stderr"))
            .spawn()
            .expect("start nginx (apt package nginx)");
        let mut n = Nginx {
            child,
            url: format!("http://127.0.0.1:{port}/"),
            dir: dir.to_path_buf(),
        };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(s)) = n.child.try_wait() {
                panic!("nginx exited ({s}):\n{}", n.logs());
            }
            assert!(
                t0.elapsed() < STARTUP,
                "nginx did not listen on {port}:\n{}",
                n.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        n
    }

    pub fn logs(&self) -> String {
        ["startup.log", "stderr.log", "error.log"]
            .iter()
            .map(|f| {
                format!(
                    "--- {f} ---\n{}",
                    std::fs::read_to_string(self.dir.join(f)).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP.

/// A response read off the wire.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Send METHOD TARGET (verbatim, not normalised) with extra header lines;
/// read the response until the server closes.
#[track_caller]
pub fn raw(addr: SocketAddr, method: &str, target: &str, extra: &[&str]) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read response");
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&all)));
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Resp {
        status,
        headers,
        body: all[split + 4..].to_vec(),
    }
}
