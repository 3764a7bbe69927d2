//! A real etcd (`/usr/bin/etcd`, Debian's etcd-server 3.4) started by a
//! test on free loopback ports, its data on tmpfs (/dev/shm), killed and
//! removed when dropped; plus history reads over its JSON gateway.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

use super::http::free_port;

/// How long etcd may take to answer after start, in seconds.
const STARTUP_SECS: u64 = 30;

/// Keys present at one revision: (key, create revision, value).
pub type Keys = Vec<(String, i64, String)>;
/// A history: the keys present at each revision.
pub type History = Vec<(i64, Keys)>;

/// A running etcd.
pub struct EtcdServer {
    child: Option<Child>,
    /// Data directory (tmpfs).
    pub data: PathBuf,
    /// Client port.
    pub port: u16,
    peer: u16,
    /// Client URL.
    pub url: String,
    log: PathBuf,
    http: reqwest::blocking::Client,
}

impl EtcdServer {
    /// Start one on free ports.
    pub fn start(name: &str) -> EtcdServer {
        assert!(
            std::path::Path::new("/usr/bin/etcd").exists(),
            "/usr/bin/etcd is missing: tests/setup.sh installs etcd-server"
        );
        let data = tempfile::Builder::new()
            .prefix(&format!("imageupd-etcd-{name}-"))
            .tempdir_in("/dev/shm")
            .expect("tmpfs dir")
            .keep();
        let (port, peer) = (free_port(), free_port());
        let mut e = EtcdServer {
            child: None,
            log: data.with_extension("log"),
            data,
            port,
            peer,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(5))
                .no_proxy()
                .build()
                .unwrap(),
        };
        e.restart();
        e
    }

    /// Start (again) on the same ports and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("/usr/bin/etcd")
            .args(["--name", "t1", "--data-dir"])
            .arg(self.data.join("d"))
            .args([
                "--listen-client-urls",
                &self.url,
                "--advertise-client-urls",
                &self.url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &format!("t1={peer}"),
                "--initial-cluster-state",
                "new",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.child = Some(child);
        let t = Instant::now();
        while self.call("/v3/kv/range", json!({"key": "eA=="})).is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(STARTUP_SECS),
                "etcd did not come up; log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL it (the data stays).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// POST to the gateway; None when etcd does not answer.
    pub fn call(&self, path: &str, body: Value) -> Option<Value> {
        self.http
            .post(format!("{}{path}", self.url))
            .body(body.to_string())
            .send()
            .ok()?
            .bytes()
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Current revision.
    pub fn revision(&self) -> i64 {
        let v = self
            .call("/v3/kv/range", json!({"key": "eA=="}))
            .expect("etcd answers");
        num(&v["header"]["revision"])
    }

    /// Keys (with create revisions and values) under `prefix` at `rev`
    /// (0: now).
    pub fn range(&self, prefix: &str, rev: i64) -> Keys {
        let v = self
            .call(
                "/v3/kv/range",
                json!({"key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix)), "revision": rev.to_string()}),
            )
            .expect("etcd answers");
        v["kvs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|kv| {
                        let dec = |f: &str| {
                            String::from_utf8(B64.decode(kv[f].as_str().unwrap_or("")).unwrap())
                                .unwrap()
                        };
                        (dec("key"), num(&kv["create_revision"]), dec("value"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// For each revision from `from` to now, the keys under `prefix`.
    pub fn history(&self, prefix: &str, from: i64) -> History {
        let now = self.revision();
        (from.max(1)..=now)
            .map(|r| (r, self.range(prefix, r)))
            .collect()
    }
}

fn num(v: &Value) -> i64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or(v.as_i64())
        .unwrap_or(0)
}

fn prefix_end(p: &str) -> Vec<u8> {
    let mut e = p.as_bytes().to_vec();
    let last = e.pop().unwrap();
    e.push(last + 1);
    e
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("IMAGEUPD_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.data);
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
