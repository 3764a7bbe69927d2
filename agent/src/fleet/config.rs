//! The `[rollout]` and `[health]` tables of the node configuration.
//!
//! ```toml
//! [rollout]
//! etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
//! group = "compute"
//! max_unavailable = 3        # or "10%" of the group's registered nodes
//! max_failures = 1           # or "5%"; unset: no circuit breaker
//! lease_secs = 10
//! # node_id = "…"            # default: derived from /etc/machine-id
//! # ca_file, cert_file, key_file, username, password: for a secured etcd
//! time_zone = "Europe/Berlin" # an IANA zone, "UTC" (the default) or "+01:00"
//! [[rollout.window]]
//! days = ["Sat", "Sun"]
//! start_time = "22:00"
//! length_minutes = 120
//!
//! [health]
//! timeout_secs = 60
//! bake_secs = 0
//! ```

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::window::{Window, WindowSpec};
use super::zone::Zone;
use crate::engine::config::Config;

/// Default key prefix of everything imageupd keeps in etcd.
pub const DEFAULT_PREFIX: &str = "/imageupd";
/// Default lease of a node's liveness keys, in seconds.
pub const DEFAULT_LEASE_SECS: u64 = 10;
/// Shortest lease etcd grants, in seconds (measured on etcd 3.4).
pub const MIN_LEASE_SECS: u64 = 2;
/// Default pause between two tries of a waiting node, in milliseconds.
pub const DEFAULT_POLL_MS: u64 = 1000;
/// Default metadata key of the phased-rollout percentage.
pub const DEFAULT_PERCENT_KEY: &str = "rollout_percent";
/// Default time limit of one health check, in seconds.
pub const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 60;

/// A number of nodes: absolute, or a percentage of the group's registered
/// nodes (`"25%"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Budget {
    /// This many nodes.
    Count(u32),
    /// This percentage of the registered nodes, rounded down, at least 1.
    Percent(f64),
}

impl Budget {
    /// Parse `3` or `"25%"` (pure).
    pub fn parse(v: &toml::Value) -> Result<Budget> {
        match v {
            toml::Value::Integer(n) if *n >= 1 && *n <= u32::MAX as i64 => {
                Ok(Budget::Count(*n as u32))
            }
            toml::Value::String(s) => Budget::parse_str(s),
            other => {
                bail!("expected a count of at least 1 or a percentage like \"25%\", not {other}")
            }
        }
    }

    /// Parse `"3"` or `"25%"` (pure).
    pub fn parse_str(s: &str) -> Result<Budget> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("bad percentage {s:?}"))?;
            if !(p > 0.0 && p <= 100.0) {
                bail!("percentage {s:?} must be in (0, 100]");
            }
            return Ok(Budget::Percent(p));
        }
        match s.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(Budget::Count(n)),
            _ => bail!("expected a count of at least 1 or a percentage like \"25%\", not {s:?}"),
        }
    }

    /// The number of nodes for a group of `registered` nodes (at least 1).
    pub fn resolve(self, registered: usize) -> u32 {
        match self {
            Budget::Count(n) => n,
            Budget::Percent(p) => (((registered as f64) * p / 100.0).floor() as u32).max(1),
        }
    }
}

/// The effective `[rollout]` table.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutConfig {
    /// etcd client URLs, tried in order.
    pub etcd: Vec<String>,
    /// Key prefix in etcd.
    pub prefix: String,
    /// The node's group (`^[a-zA-Z0-9.-]+$`).
    pub group: String,
    /// Most nodes of the group disrupted at once.
    pub max_unavailable: Budget,
    /// Failed nodes (of one target) that halt the group; `None`: never.
    pub max_failures: Option<Budget>,
    /// Lease of the node's liveness keys, in seconds.
    pub lease_secs: u64,
    /// The node's id; `None`: derived from `etc/machine-id`.
    pub node_id: Option<String>,
    /// CA certificate(s) (PEM) for an `https://` etcd.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for etcd.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for `cert_file`.
    pub key_file: Option<PathBuf>,
    /// etcd user name (with `password`).
    pub username: Option<String>,
    /// etcd password.
    #[serde(skip_serializing)]
    pub password: Option<String>,
    /// Pause between two tries of a waiting node, in milliseconds.
    pub poll_ms: u64,
    /// Metadata key of the phased-rollout percentage.
    pub percent_key: String,
    /// The time zone the windows are written in (an IANA zone follows its
    /// daylight saving time).
    pub time_zone: Zone,
    /// Weekly maintenance windows; empty: always open.
    pub windows: Vec<Window>,
}

/// The `[rollout]` table of one fragment: every key optional.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct RolloutFragment {
    etcd: Option<Vec<String>>,
    prefix: Option<String>,
    group: Option<String>,
    max_unavailable: Option<toml::Value>,
    max_failures: Option<toml::Value>,
    lease_secs: Option<u64>,
    node_id: Option<String>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    username: Option<String>,
    password: Option<String>,
    poll_ms: Option<u64>,
    percent_key: Option<String>,
    time_zone: Option<String>,
    window: Option<Vec<WindowSpec>>,
}

/// Whether `g` is a valid group name (zincati's rule, `^[a-zA-Z0-9.-]+$`).
pub fn valid_group(g: &str) -> bool {
    !g.is_empty()
        && g.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

/// Whether `id` is a valid node id: 1–128 bytes of `[A-Za-z0-9._-]`.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl RolloutConfig {
    /// Fold one fragment into `cur` (None: no `[rollout]` so far).
    pub(crate) fn merge(cur: Option<RolloutConfig>, f: RolloutFragment) -> Result<RolloutConfig> {
        let mut c = cur.unwrap_or(RolloutConfig {
            etcd: Vec::new(),
            prefix: DEFAULT_PREFIX.into(),
            group: String::new(),
            max_unavailable: Budget::Count(1),
            max_failures: None,
            lease_secs: DEFAULT_LEASE_SECS,
            node_id: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            poll_ms: DEFAULT_POLL_MS,
            percent_key: DEFAULT_PERCENT_KEY.into(),
            time_zone: Zone::default(),
            windows: Vec::new(),
        });
        if let Some(e) = f.etcd {
            if e.iter()
                .any(|u| !(u.starts_with("http://") || u.starts_with("https://")))
            {
                bail!("etcd endpoints must be http:// or https:// URLs: {e:?}");
            }
            c.etcd = e;
        }
        if let Some(p) = f.prefix {
            if !p.starts_with('/') || p.ends_with('/') {
                bail!("prefix must start with / and not end with one: {p:?}");
            }
            c.prefix = p;
        }
        if let Some(g) = f.group {
            if !valid_group(&g) {
                bail!("group {g:?} must match ^[a-zA-Z0-9.-]+$");
            }
            c.group = g;
        }
        if let Some(v) = f.max_unavailable {
            c.max_unavailable =
                Budget::parse(&v).map_err(|e| anyhow::anyhow!("max_unavailable: {e}"))?;
        }
        if let Some(v) = f.max_failures {
            c.max_failures =
                Some(Budget::parse(&v).map_err(|e| anyhow::anyhow!("max_failures: {e}"))?);
        }
        if let Some(l) = f.lease_secs {
            if l < MIN_LEASE_SECS {
                bail!("lease_secs must be at least {MIN_LEASE_SECS}");
            }
            c.lease_secs = l;
        }
        if let Some(id) = f.node_id {
            if !valid_node_id(&id) {
                bail!("node_id {id:?} must be 1-128 characters of [A-Za-z0-9._-]");
            }
            c.node_id = Some(id);
        }
        if let Some(p) = f.poll_ms {
            if p == 0 {
                bail!("poll_ms must be at least 1");
            }
            c.poll_ms = p;
        }
        if let Some(k) = f.percent_key {
            if k.is_empty() {
                bail!("percent_key must not be empty");
            }
            c.percent_key = k;
        }
        if let Some(tz) = f.time_zone {
            c.time_zone = Zone::parse(&tz)?;
        }
        if let Some(ws) = f.window {
            c.windows = ws.iter().map(Window::from_spec).collect::<Result<_>>()?;
        }
        macro_rules! take {
            ($($k:ident),*) => { $( if f.$k.is_some() { c.$k = f.$k; } )* };
        }
        take!(ca_file, cert_file, key_file, username, password);
        if c.cert_file.is_some() != c.key_file.is_some() {
            bail!("cert_file and key_file go together");
        }
        Ok(c)
    }

    /// Check what a fragment cannot: the table as a whole is usable.
    pub fn validate(&self) -> Result<()> {
        if self.etcd.is_empty() {
            bail!("[rollout] needs etcd = [\"http://HOST:2379\", …]");
        }
        if self.group.is_empty() {
            bail!("[rollout] needs a group");
        }
        if self.username.is_some() != self.password.is_some() {
            bail!("[rollout] username and password go together");
        }
        Ok(())
    }
}

/// The effective `[health]` table: the health gate after the post-apply
/// hooks (`etc/imageupd/health.d/{required,wanted}.d/`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct HealthConfig {
    /// Time limit of one check, in seconds.
    pub timeout_secs: u64,
    /// Wait after the checks first pass, then run them again, in seconds
    /// (0: no bake).
    pub bake_secs: u64,
    /// Roll back in place when a required check fails.
    pub rollback: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            timeout_secs: DEFAULT_HEALTH_TIMEOUT_SECS,
            bake_secs: 0,
            rollback: true,
        }
    }
}

/// The `[health]` table of one fragment.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
pub(crate) struct HealthFragment {
    timeout_secs: Option<u64>,
    bake_secs: Option<u64>,
    rollback: Option<bool>,
}

impl HealthConfig {
    /// Fold one fragment in.
    pub(crate) fn merge(&mut self, f: HealthFragment) -> Result<()> {
        if f.timeout_secs == Some(0) {
            bail!("timeout_secs must be at least 1");
        }
        if let Some(t) = f.timeout_secs {
            self.timeout_secs = t;
        }
        if let Some(b) = f.bake_secs {
            self.bake_secs = b;
        }
        if let Some(r) = f.rollback {
            self.rollback = r;
        }
        Ok(())
    }
}

fn sources(cfg: &Config) -> String {
    let v: Vec<String> = cfg
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    v.join(", ")
}

/// The node's `[rollout]` table, parsed and checked; `None` without one.
pub fn rollout(cfg: &Config) -> Result<Option<RolloutConfig>> {
    let Some(t) = &cfg.rollout else {
        return Ok(None);
    };
    let parse = || -> Result<RolloutConfig> {
        let f: RolloutFragment = toml::Value::Table(t.clone()).try_into()?;
        let r = RolloutConfig::merge(None, f)?;
        r.validate()?;
        Ok(r)
    };
    parse()
        .map(Some)
        .with_context(|| format!("table [rollout] of {}", sources(cfg)))
}

/// The node's `[health]` table, parsed (defaults without one).
pub fn health(cfg: &Config) -> Result<HealthConfig> {
    let mut h = HealthConfig::default();
    if let Some(t) = &cfg.health {
        let f: HealthFragment = toml::Value::Table(t.clone())
            .try_into()
            .with_context(|| format!("table [health] of {}", sources(cfg)))?;
        h.merge(f)
            .with_context(|| format!("table [health] of {}", sources(cfg)))?;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frag(t: &str) -> RolloutFragment {
        toml::from_str(t).unwrap()
    }

    #[test]
    fn budgets() {
        assert_eq!(Budget::parse_str("3").unwrap(), Budget::Count(3));
        assert_eq!(Budget::parse_str("25%").unwrap(), Budget::Percent(25.0));
        assert!(Budget::parse_str("0").is_err());
        assert!(Budget::parse_str("0%").is_err());
        assert!(Budget::parse_str("101%").is_err());
        assert_eq!(Budget::Percent(25.0).resolve(12), 3);
        assert_eq!(Budget::Percent(25.0).resolve(2), 1, "at least one");
        assert_eq!(Budget::Count(3).resolve(0), 3);
    }

    #[test]
    fn rollout_table() {
        let c = RolloutConfig::merge(
            None,
            frag("etcd = [\"http://127.0.0.1:2379\"]\ngroup = \"compute\"\nmax_unavailable = \"25%\"\nmax_failures = 1\ntime_zone = \"+02:00\"\n[[window]]\ndays = [\"Mon\"]\nstart_time = \"01:30\"\nlength_minutes = 60\n"),
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_unavailable, Budget::Percent(25.0));
        assert_eq!(c.max_failures, Some(Budget::Count(1)));
        assert_eq!(c.time_zone.offset_at(0), 7200);
        assert_eq!(c.windows.len(), 1);
        let c = RolloutConfig::merge(Some(c), frag("lease_secs = 5")).unwrap();
        assert_eq!(c.lease_secs, 5);
        assert_eq!(c.group, "compute");
        for bad in [
            "group = \"a b\"",
            "lease_secs = 1",
            "etcd = [\"10.0.0.1:2379\"]",
            "max_unavailable = 0",
            "node_id = \"a/b\"",
            "cert_file = \"/c\"",
            "bogus = 1",
        ] {
            let f: Result<RolloutFragment, _> = toml::from_str(bad);
            let r = f
                .map_err(anyhow::Error::from)
                .and_then(|f| RolloutConfig::merge(None, f));
            assert!(r.is_err(), "{bad}");
        }
        let empty = RolloutConfig::merge(None, RolloutFragment::default()).unwrap();
        assert!(empty.validate().is_err());
    }

    #[test]
    fn node_config_fragments() {
        let mut c = Config::default();
        assert!(rollout(&c).unwrap().is_none(), "no [rollout]: no rollout");
        let p = std::path::Path::new;
        c.merge_str(
            "[rollout]\netcd = [\"http://e:2379\"]\ngroup = \"ha-a\"\nmax_unavailable = 2\n",
            p("a.toml"),
        )
        .unwrap();
        c.merge_str(
            "[rollout]\nmax_unavailable = \"50%\"\n[health]\nbake_secs = 5\n",
            p("b.toml"),
        )
        .unwrap();
        let r = rollout(&c).unwrap().unwrap();
        assert_eq!(
            (r.group.as_str(), r.max_unavailable),
            ("ha-a", Budget::Percent(50.0))
        );
        assert_eq!(health(&c).unwrap().bake_secs, 5);
        c.merge_str("[rollout]\nlease_secs = 1\n", p("c.toml"))
            .unwrap();
        let e = format!("{:#}", rollout(&c).unwrap_err());
        assert!(e.contains("c.toml") && e.contains("lease_secs"), "{e}");
    }
}
