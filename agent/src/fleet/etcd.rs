//! A small etcd v3 client over etcd's JSON gRPC gateway (`/v3/kv/range`,
//! `/v3/kv/txn`, `/v3/kv/deleterange`, `/v3/lease/*`), with the blocking
//! `reqwest` client the fetcher already uses. Keys and values travel
//! base64-encoded; 64-bit numbers come back as strings.
//!
//! Why not the `etcd-client` crate: it pulls tonic and prost and needs
//! `protoc` at build time; five JSON calls do not justify that. The
//! parsers below take JSON values and do no I/O.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

/// Time limit to connect to one endpoint, in milliseconds.
pub const CONNECT_TIMEOUT_MS: u64 = 1000;
/// Time limit of one request, in milliseconds.
pub const REQUEST_TIMEOUT_MS: u64 = 3000;

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint answered.
    #[error("etcd is unreachable ({0})")]
    Unreachable(String),
    /// etcd answered with an error.
    #[error("etcd refused the request: {0}")]
    Refused(String),
    /// The answer could not be understood.
    #[error("unexpected answer from etcd: {0}")]
    Bad(String),
}

/// One key-value pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key (UTF-8; imageupd only writes UTF-8 keys).
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// Revision that created the key.
    pub create_revision: i64,
    /// Revision of the last change.
    pub mod_revision: i64,
    /// Lease the key is bound to (0: none).
    pub lease: i64,
}

/// A condition of a transaction.
#[derive(Debug, Clone)]
pub enum Cmp {
    /// The key does not exist.
    Absent(String),
    /// The key holds exactly these bytes.
    ValueIs(String, Vec<u8>),
}

/// An operation of a transaction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Put, bound to a lease when not 0.
    Put(String, Vec<u8>, i64),
    /// Delete one key.
    Delete(String),
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

fn num(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The key just after every key starting with `prefix` (etcd's range end).
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut e = prefix.as_bytes().to_vec();
    while let Some(last) = e.pop() {
        if last < 0xff {
            e.push(last + 1);
            return e;
        }
    }
    vec![0]
}

/// Parse the `kvs` of a range answer (pure).
pub fn parse_kvs(v: &Value) -> Result<Vec<Kv>, EtcdError> {
    let Some(kvs) = v.get("kvs") else {
        return Ok(Vec::new());
    };
    let arr = kvs
        .as_array()
        .ok_or_else(|| EtcdError::Bad("kvs is not a list".into()))?;
    arr.iter()
        .map(|kv| {
            let dec = |f: &str| -> Result<Vec<u8>, EtcdError> {
                match kv.get(f).and_then(Value::as_str) {
                    None => Ok(Vec::new()),
                    Some(s) => B64
                        .decode(s)
                        .map_err(|e| EtcdError::Bad(format!("{f}: {e}"))),
                }
            };
            Ok(Kv {
                key: String::from_utf8_lossy(&dec("key")?).into_owned(),
                value: dec("value")?,
                create_revision: num(&kv["create_revision"]),
                mod_revision: num(&kv["mod_revision"]),
                lease: num(&kv["lease"]),
            })
        })
        .collect()
}

/// The header revision of an answer (pure).
pub fn revision(v: &Value) -> i64 {
    num(&v["header"]["revision"])
}

/// The JSON body of a transaction (pure).
pub fn txn_body(cmps: &[Cmp], ops: &[Op]) -> Value {
    let compare: Vec<Value> = cmps
        .iter()
        .map(|c| match c {
            Cmp::Absent(k) => json!({"key": b64(k.as_bytes()), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}),
            Cmp::ValueIs(k, v) => json!({"key": b64(k.as_bytes()), "result": "EQUAL", "target": "VALUE", "value": b64(v)}),
        })
        .collect();
    let success: Vec<Value> = ops
        .iter()
        .map(|o| match o {
            Op::Put(k, v, lease) => json!({"request_put": {"key": b64(k.as_bytes()), "value": b64(v), "lease": lease.to_string()}}),
            Op::Delete(k) => json!({"request_delete_range": {"key": b64(k.as_bytes())}}),
        })
        .collect();
    json!({"compare": compare, "success": success})
}

/// Connection settings.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Client URLs, tried in order.
    pub endpoints: Vec<String>,
    /// CA certificate(s) (PEM).
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// User name and password.
    pub credentials: Option<(String, String)>,
}

/// A client.
#[derive(Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    http: reqwest::blocking::Client,
    credentials: Option<(String, String)>,
    token: Mutex<Option<String>>,
}

fn read(p: &Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

impl Etcd {
    /// A client for `o` (no connection is made yet).
    pub fn new(o: &EtcdOptions) -> anyhow::Result<Etcd> {
        let mut b = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
            .no_proxy();
        if let Some(ca) = &o.ca_file {
            for c in reqwest::Certificate::from_pem_bundle(&read(ca)?)? {
                b = b.add_root_certificate(c);
            }
        }
        if let Some((cert, key)) = &o.identity {
            let mut pem = read(cert)?;
            pem.extend(read(key)?);
            b = b.identity(reqwest::Identity::from_pem(&pem)?);
        }
        Ok(Etcd {
            endpoints: o.endpoints.clone(),
            http: b.build()?,
            credentials: o.credentials.clone(),
            token: Mutex::new(None),
        })
    }

    fn post(&self, ep: &str, path: &str, body: &Value, auth: bool) -> Result<Value, String> {
        let mut rq = self
            .http
            .post(format!("{}{path}", ep.trim_end_matches('/')))
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if auth {
            if let Some(t) = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone() {
                rq = rq.header("Authorization", t);
            }
        }
        let resp = rq.send().map_err(|e| format!("{ep}: {e}"))?;
        let status = resp.status();
        let bytes = resp.bytes().map_err(|e| format!("{ep}: {e}"))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| format!("{ep}: {e}"))?;
        if !status.is_success() || v.get("error").is_some() {
            return Ok(
                json!({"__error": v.get("message").or(v.get("error")).cloned().unwrap_or(Value::Null), "__status": status.as_u16()}),
            );
        }
        Ok(v)
    }

    /// POST `body` to `path` on the first endpoint that answers.
    pub fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let mut errs = Vec::new();
        for ep in &self.endpoints {
            match self.post(ep, path, &body, true) {
                Ok(v) => {
                    if let Some(e) = v.get("__error") {
                        let msg = e.as_str().unwrap_or("").to_owned();
                        if self.credentials.is_some()
                            && (msg.contains("token") || msg.contains("user name is empty"))
                        {
                            self.authenticate(ep)?;
                            return self.call_once(ep, path, &body);
                        }
                        return Err(EtcdError::Refused(format!("{path}: {msg}")));
                    }
                    return Ok(v);
                }
                Err(e) => errs.push(e),
            }
        }
        Err(EtcdError::Unreachable(errs.join("; ")))
    }

    fn call_once(&self, ep: &str, path: &str, body: &Value) -> Result<Value, EtcdError> {
        match self.post(ep, path, body, true) {
            Ok(v) if v.get("__error").is_some() => {
                Err(EtcdError::Refused(format!("{path}: {}", v["__error"])))
            }
            Ok(v) => Ok(v),
            Err(e) => Err(EtcdError::Unreachable(e)),
        }
    }

    fn authenticate(&self, ep: &str) -> Result<(), EtcdError> {
        let Some((u, p)) = &self.credentials else {
            return Ok(());
        };
        let v = self
            .post(
                ep,
                "/v3/auth/authenticate",
                &json!({"name": u, "password": p}),
                false,
            )
            .map_err(EtcdError::Unreachable)?;
        let t = v["token"].as_str().ok_or_else(|| {
            EtcdError::Refused(format!("authentication as {u} failed: {}", v["__error"]))
        })?;
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.to_owned());
        Ok(())
    }

    /// Every key under `prefix`, and the revision of the read.
    pub fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>), EtcdError> {
        let v = self.call(
            "/v3/kv/range",
            json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))}),
        )?;
        Ok((revision(&v), parse_kvs(&v)?))
    }

    /// One key.
    pub fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let v = self.call("/v3/kv/range", json!({"key": b64(key.as_bytes())}))?;
        Ok(parse_kvs(&v)?.into_iter().next())
    }

    /// Put, bound to `lease` unless 0.
    pub fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let v = self.call(
            "/v3/kv/put",
            json!({"key": b64(key.as_bytes()), "value": b64(value), "lease": lease.to_string()}),
        )?;
        Ok(revision(&v))
    }

    /// Delete one key; how many were deleted.
    pub fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let v = self.call("/v3/kv/deleterange", json!({"key": b64(key.as_bytes())}))?;
        Ok(num(&v["deleted"]))
    }

    /// If every condition holds, do every operation, atomically. Whether
    /// it did, and the revision.
    pub fn txn(&self, cmps: &[Cmp], ops: &[Op]) -> Result<(bool, i64), EtcdError> {
        let v = self.call("/v3/kv/txn", txn_body(cmps, ops))?;
        Ok((v["succeeded"].as_bool().unwrap_or(false), revision(&v)))
    }

    /// A new lease of `ttl_secs`; its id.
    pub fn lease_grant(&self, ttl_secs: u64) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/grant", json!({"TTL": ttl_secs.to_string()}))?;
        match num(&v["ID"]) {
            0 => Err(EtcdError::Bad(format!("lease grant without an ID: {v}"))),
            id => Ok(id),
        }
    }

    /// Refresh a lease; its remaining TTL in seconds (0: the lease is gone).
    pub fn lease_keepalive(&self, id: i64) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/keepalive", json!({"ID": id.to_string()}))?;
        Ok(num(&v["result"]["TTL"]))
    }

    /// Revoke a lease (its keys go with it).
    pub fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        match self.call("/v3/lease/revoke", json!({"ID": id.to_string()})) {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused(m)) if m.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_and_bodies() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        let v = json!({"header": {"revision": "7"}, "kvs": [{"key": "Zm9v", "create_revision": "2", "mod_revision": "5", "version": "1", "value": "YmFy", "lease": "9"}], "count": "1"});
        assert_eq!(revision(&v), 7);
        let kvs = parse_kvs(&v).unwrap();
        assert_eq!(kvs[0].key, "foo");
        assert_eq!(kvs[0].value, b"bar");
        assert_eq!(
            (kvs[0].create_revision, kvs[0].mod_revision, kvs[0].lease),
            (2, 5, 9)
        );
        assert!(parse_kvs(&json!({"header": {}})).unwrap().is_empty());
        assert!(parse_kvs(&json!({"kvs": [{"key": "!!"}]})).is_err());
        let b = txn_body(
            &[Cmp::Absent("k".into())],
            &[
                Op::Put("k".into(), b"v".to_vec(), 3),
                Op::Delete("d".into()),
            ],
        );
        assert_eq!(b["compare"][0]["target"], "CREATE");
        assert_eq!(b["success"][0]["request_put"]["lease"], "3");
        assert_eq!(b["success"][1]["request_delete_range"]["key"], "ZA==");
    }
}
