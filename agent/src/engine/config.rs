//! Node configuration: `etc/imageupd/config.toml`, then
//! `etc/imageupd/config.d/*.toml` in name order, later files overriding
//! earlier ones key by key. Unknown keys are errors that name the file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::fs::preserve::{Preserve, DEFAULT_PRESERVE};
use crate::net::limits::{FetchFragment, FetchLimits};

/// Default per-hook timeout, in seconds.
pub const DEFAULT_HOOK_TIMEOUT_SECS: u64 = 300;
/// Default free-space margin kept on the root beyond what staging needs, in MiB.
pub const DEFAULT_SPACE_MARGIN_MIB: u64 = 64;

/// What to do when the kernel changes (SPEC §8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelPolicy {
    /// Load the new kernel and `systemctl kexec`.
    Kexec,
    /// Reboot through systemd.
    Reboot,
    /// Record reboot-required; the operator acts later.
    Defer,
}

impl std::str::FromStr for KernelPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kexec" => Ok(KernelPolicy::Kexec),
            "reboot" => Ok(KernelPolicy::Reboot),
            "defer" => Ok(KernelPolicy::Defer),
            _ => Err(format!(
                "unknown kernel policy {s:?} (expected kexec, reboot or defer)"
            )),
        }
    }
}

/// Effective configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// Accept unsigned manifests.
    pub allow_unsigned: bool,
    /// Per-hook timeout in seconds.
    pub hook_timeout_secs: u64,
    /// Preserve list (replaces the default when set in a file).
    pub preserve: Vec<String>,
    /// Kernel policy.
    pub kernel_policy: KernelPolicy,
    /// Free-space margin in MiB.
    pub space_margin_mib: u64,
    /// Worker threads for hashing, decompression and copying (0 = CPUs).
    pub threads: usize,
    /// The `[agent]` table: metadata source, keys, timings.
    pub agent: AgentConfig,
    /// Extra CA certificate(s) (PEM) for `https://` sources, a path on the node.
    pub ca_file: Option<PathBuf>,
    /// The node's role: images whose signed `compatible` differs are refused.
    pub compatible: Option<String>,
    /// Accept a store index (`timestamp.json`) past its expiry, with a
    /// warning. Off: an expired index is refused (exit 4), since a frozen
    /// store is how a node is kept from learning of a fix.
    pub allow_expired_index: bool,
    /// The node_exporter textfile the agent and every apply write their
    /// metrics to, a path on the node (see docs/metrics.md); `None`:
    /// `metrics.prom` in the root's runtime directory.
    pub metrics_file: Option<PathBuf>,
    /// Files that contributed, in order.
    pub sources: Vec<PathBuf>,
    /// The `[rollout]` table as written, merged key by key over the
    /// fragments; parsed and checked by the fleet layer
    /// (`crate::fleet::config`). `None`: apply as soon as the metadata
    /// says so.
    pub rollout: Option<toml::Table>,
    /// The `[health]` table (the health gate), likewise.
    pub health: Option<toml::Table>,
    /// The `[fetch]` table: byte caps, low-speed abort and deadline of
    /// every download (`crate::net::limits`).
    pub fetch: FetchLimits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            allow_unsigned: false,
            hook_timeout_secs: DEFAULT_HOOK_TIMEOUT_SECS,
            preserve: DEFAULT_PRESERVE.iter().map(|s| s.to_string()).collect(),
            kernel_policy: KernelPolicy::Kexec,
            space_margin_mib: DEFAULT_SPACE_MARGIN_MIB,
            threads: 0,
            agent: AgentConfig::default(),
            ca_file: None,
            compatible: None,
            allow_expired_index: false,
            metrics_file: None,
            sources: Vec::new(),
            rollout: None,
            health: None,
            fetch: FetchLimits::default(),
        }
    }
}

/// One fragment: every key optional.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct Fragment {
    allow_unsigned: Option<bool>,
    hook_timeout_secs: Option<u64>,
    preserve: Option<Vec<String>>,
    preserve_extra: Option<Vec<String>>,
    kernel_policy: Option<KernelPolicy>,
    space_margin_mib: Option<u64>,
    threads: Option<usize>,
    agent: Option<AgentFragment>,
    ca_file: Option<PathBuf>,
    compatible: Option<String>,
    allow_expired_index: Option<bool>,
    metrics_file: Option<PathBuf>,
    rollout: Option<toml::Table>,
    health: Option<toml::Table>,
    fetch: Option<FetchFragment>,
}

impl Config {
    /// Parse one fragment's text over `self`.
    pub fn merge_str(&mut self, text: &str, origin: &Path) -> Result<()> {
        let f: Fragment = toml::from_str(text)
            .with_context(|| format!("invalid configuration in {}", origin.display()))?;
        if let Some(v) = f.allow_unsigned {
            self.allow_unsigned = v;
        }
        if let Some(v) = f.hook_timeout_secs {
            if v == 0 {
                bail!("{}: hook_timeout_secs must be at least 1", origin.display());
            }
            self.hook_timeout_secs = v;
        }
        if let Some(v) = f.preserve {
            Preserve::new(&v)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: key preserve", origin.display()))?;
            self.preserve = v;
        }
        if let Some(v) = f.preserve_extra {
            Preserve::new(&v)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: key preserve_extra", origin.display()))?;
            self.preserve.extend(v);
        }
        if let Some(v) = f.kernel_policy {
            self.kernel_policy = v;
        }
        if let Some(v) = f.space_margin_mib {
            self.space_margin_mib = v;
        }
        if let Some(v) = f.threads {
            self.threads = v;
        }
        if let Some(a) = f.agent {
            self.agent
                .merge(a)
                .with_context(|| format!("{}: table [agent]", origin.display()))?;
        }
        if let Some(v) = f.ca_file {
            self.ca_file = Some(v);
        }
        if let Some(v) = f.compatible {
            crate::format::manifest::validate_label(&v)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("{}: key compatible", origin.display()))?;
            self.compatible = Some(v);
        }
        if let Some(v) = f.allow_expired_index {
            self.allow_expired_index = v;
        }
        if let Some(t) = f.fetch {
            self.fetch
                .merge(t)
                .with_context(|| format!("{}: table [fetch]", origin.display()))?;
        }
        if let Some(v) = f.metrics_file {
            if !v.is_absolute() || v.file_name().is_none() {
                bail!(
                    "{}: key metrics_file must be an absolute file path, not {:?}",
                    origin.display(),
                    v
                );
            }
            self.metrics_file = Some(v);
        }
        for (have, t) in [(&mut self.rollout, f.rollout), (&mut self.health, f.health)] {
            if let Some(t) = t {
                have.get_or_insert_with(Default::default).extend(t);
            }
        }
        self.sources.push(origin.to_path_buf());
        Ok(())
    }

    /// Load the configuration of the node whose root is `root`.
    pub fn load(root: &Path) -> Result<Config> {
        let mut c = Config::default();
        let base = root.join("etc/imageupd");
        let main = base.join("config.toml");
        match std::fs::read_to_string(&main) {
            Ok(t) => c.merge_str(&t, &main)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", main.display())),
        }
        let dir = base.join("config.d");
        let mut frags: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        frags.sort();
        for f in frags {
            let t =
                std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            c.merge_str(&t, &f)?;
        }
        Ok(c)
    }

    /// Worker threads to use.
    pub fn threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }
    }
}

/// Default rescan interval of the agent, in seconds: the safety net under
/// inotify.
pub const DEFAULT_RESCAN_SECS: u64 = 60;
/// Default debounce of metadata changes, in milliseconds: how long the
/// metadata must stay quiet before the agent reads it.
pub const DEFAULT_DEBOUNCE_MS: u64 = 1000;
/// Default first retry delay after a failed update, in seconds.
pub const DEFAULT_BACKOFF_MIN_SECS: u64 = 30;
/// Default longest retry delay after repeated failures, in seconds.
pub const DEFAULT_BACKOFF_MAX_SECS: u64 = 3600;
/// Longest accepted debounce, in milliseconds (one minute).
pub const MAX_DEBOUNCE_MS: u64 = 60_000;

/// Settings of `imageupd agent` and `apply --from-metadata`: the `[agent]`
/// table of the configuration.
///
/// ```toml
/// [agent]
/// metadata_dir = "/var/lib/os-collect-config" # os-collect-config cache (TripleO)
/// # metadata_file = "/etc/imageupd/metadata.json" # a plain JSON file instead
/// image_id_key = "image_id"        # dotted key, list indexes allowed: "a.b.0.id"
/// image_source_key = "image_source"
/// default_source = "https://images.example/store" # when metadata names none
/// rescan_secs = 60
/// debounce_ms = 1000
/// backoff_min_secs = 30
/// backoff_max_secs = 3600
/// track_changes = true
/// track_max_dirs = 16384
/// ```
///
/// Metadata paths are host paths (not re-rooted under `--root`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AgentConfig {
    /// os-collect-config's cache directory; its `os_config_files.json` lists
    /// the files to merge (`$OS_CONFIG_FILES` overrides the list).
    pub metadata_dir: PathBuf,
    /// A plain JSON metadata file; when set it is used instead of
    /// `metadata_dir`.
    pub metadata_file: Option<PathBuf>,
    /// Dotted key of the target image id.
    pub image_id_key: String,
    /// Dotted key of the image source (store URL or directory).
    pub image_source_key: String,
    /// Source used when the metadata names none (like `--from`).
    pub default_source: Option<String>,
    /// Full rescan interval, in seconds (at least 1).
    pub rescan_secs: u64,
    /// Quiet time before a burst of metadata changes is read, in
    /// milliseconds (at most [`MAX_DEBOUNCE_MS`]).
    pub debounce_ms: u64,
    /// Retry delay after the first failure of an image, in seconds (at
    /// least 1); it doubles with each further failure.
    pub backoff_min_secs: u64,
    /// Cap of the retry delay, in seconds; taken as at least
    /// `backoff_min_secs`.
    pub backoff_max_secs: u64,
    /// Track changes to the root between updates (fanotify), so a plan
    /// lists only the directories that changed instead of the whole tree.
    pub track_changes: bool,
    /// Changed directories remembered between updates before the next walk
    /// falls back to a full one (at least 1).
    pub track_max_dirs: usize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            metadata_dir: PathBuf::from(DEFAULT_OCC_CACHE_DIR),
            metadata_file: None,
            image_id_key: DEFAULT_IMAGE_ID_KEY.into(),
            image_source_key: DEFAULT_IMAGE_SOURCE_KEY.into(),
            default_source: None,
            rescan_secs: DEFAULT_RESCAN_SECS,
            debounce_ms: DEFAULT_DEBOUNCE_MS,
            backoff_min_secs: DEFAULT_BACKOFF_MIN_SECS,
            backoff_max_secs: DEFAULT_BACKOFF_MAX_SECS,
            track_changes: true,
            track_max_dirs: crate::fs::track::DEFAULT_MAX_DIRS,
        }
    }
}

/// The `[agent]` table of one fragment: every key optional.
#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct AgentFragment {
    metadata_dir: Option<PathBuf>,
    metadata_file: Option<PathBuf>,
    image_id_key: Option<String>,
    image_source_key: Option<String>,
    default_source: Option<String>,
    rescan_secs: Option<u64>,
    debounce_ms: Option<u64>,
    backoff_min_secs: Option<u64>,
    backoff_max_secs: Option<u64>,
    track_changes: Option<bool>,
    track_max_dirs: Option<usize>,
}

impl AgentConfig {
    fn merge(&mut self, f: AgentFragment) -> Result<()> {
        for (name, p) in [
            ("metadata_dir", &f.metadata_dir),
            ("metadata_file", &f.metadata_file),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    bail!("{name} must be an absolute path, not {}", p.display());
                }
            }
        }
        for (name, k) in [
            ("image_id_key", &f.image_id_key),
            ("image_source_key", &f.image_source_key),
        ] {
            if k.as_deref().is_some_and(|k| k.is_empty()) {
                bail!("{name} must not be empty");
            }
        }
        if f.rescan_secs == Some(0) {
            bail!("rescan_secs must be at least 1");
        }
        if f.debounce_ms.is_some_and(|d| d > MAX_DEBOUNCE_MS) {
            bail!("debounce_ms must be at most {MAX_DEBOUNCE_MS}");
        }
        if f.backoff_min_secs == Some(0) || f.backoff_max_secs == Some(0) {
            bail!("backoff_min_secs and backoff_max_secs must be at least 1");
        }
        if f.track_max_dirs == Some(0) {
            bail!("track_max_dirs must be at least 1");
        }
        let AgentFragment {
            metadata_dir,
            metadata_file,
            image_id_key,
            image_source_key,
            default_source,
            rescan_secs,
            debounce_ms,
            backoff_min_secs,
            backoff_max_secs,
            track_changes,
            track_max_dirs,
        } = f;
        set(&mut self.metadata_dir, metadata_dir);
        if metadata_file.is_some() {
            self.metadata_file = metadata_file;
        }
        set(&mut self.image_id_key, image_id_key);
        set(&mut self.image_source_key, image_source_key);
        if let Some(s) = default_source {
            self.default_source = Some(s).filter(|s| !s.is_empty());
        }
        set(&mut self.rescan_secs, rescan_secs);
        set(&mut self.debounce_ms, debounce_ms);
        set(&mut self.backoff_min_secs, backoff_min_secs);
        set(&mut self.backoff_max_secs, backoff_max_secs);
        set(&mut self.track_changes, track_changes);
        set(&mut self.track_max_dirs, track_max_dirs);
        Ok(())
    }

    /// The metadata source these settings name; `$OS_CONFIG_FILES` (passed
    /// as `env_files`) overrides the cache's list file.
    pub fn metadata_source(&self, env_files: Option<String>) -> MetadataSource {
        match &self.metadata_file {
            Some(f) => MetadataSource::File(f.clone()),
            None => MetadataSource::Occ {
                cache_dir: self.metadata_dir.clone(),
                env_files,
            },
        }
    }

    /// The retry policy.
    pub fn backoff(&self) -> crate::sys::backoff::Backoff {
        crate::sys::backoff::Backoff::new(
            std::time::Duration::from_secs(self.backoff_min_secs),
            std::time::Duration::from_secs(self.backoff_max_secs.max(self.backoff_min_secs)),
        )
    }
}

fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_override_and_errors_name_the_file() {
        let mut c = Config::default();
        c.merge_str(
            "allow_unsigned = true\nhook_timeout_secs = 5\n",
            Path::new("a.toml"),
        )
        .unwrap();
        c.merge_str(
            "hook_timeout_secs = 7\npreserve_extra = [\"/srv/data/\"]\n",
            Path::new("b.toml"),
        )
        .unwrap();
        assert!(c.allow_unsigned);
        assert_eq!(c.hook_timeout_secs, 7);
        assert!(c.preserve.iter().any(|p| p == "/srv/data/"));
        let err = c
            .merge_str("bogus = 1\n", Path::new("/etc/imageupd/config.d/10-x.toml"))
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("10-x.toml") && msg.contains("bogus"), "{msg}");
        let err = c
            .merge_str("preserve = [\"relative\"]\n", Path::new("p.toml"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("p.toml"));
        let err = c
            .merge_str("kernel_policy = \"yolo\"\n", Path::new("k.toml"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("k.toml"));
    }

    /// The package's commented default configuration is valid with every
    /// setting uncommented (a line `#key = …` or `#[table]`).
    #[test]
    fn packaged_default_config_parses_uncommented() {
        let text = include_str!("../../../packaging/deb/config.toml");
        let on: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                Some(r) if r.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => r,
                _ => l,
            })
            .flat_map(|l| [l, "\n"])
            .collect();
        let mut c = Config::default();
        c.merge_str(&on, Path::new("config.toml")).unwrap();
        assert_eq!(
            c.metrics_file.as_deref(),
            Some(Path::new("/var/lib/prometheus/node-exporter/imageupd.prom"))
        );
        assert!(c.rollout.is_some() && c.agent.default_source.is_some());
        let err = c
            .merge_str("metrics_file = \"relative.prom\"\n", Path::new("m.toml"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("metrics_file"), "{err:#}");
    }

    #[test]
    fn agent_table() {
        let mut c = Config::default();
        assert_eq!(c.agent.image_id_key, "image_id");
        c.merge_str("[agent]\nmetadata_file = \"/srv/meta.json\"\nimage_id_key = \"deploy.image\"\ndebounce_ms = 50\n", Path::new("a.toml")).unwrap();
        c.merge_str(
            "[agent]\nbackoff_min_secs = 5\nbackoff_max_secs = 2\ndefault_source = \"/store\"\n",
            Path::new("b.toml"),
        )
        .unwrap();
        assert_eq!(
            c.agent.metadata_file.as_deref(),
            Some(Path::new("/srv/meta.json"))
        );
        assert_eq!(c.agent.image_id_key, "deploy.image");
        assert_eq!(c.agent.debounce_ms, 50);
        assert_eq!(c.agent.default_source.as_deref(), Some("/store"));
        assert_eq!(
            c.agent.backoff().max,
            std::time::Duration::from_secs(5),
            "max is at least min"
        );
        assert!(matches!(
            c.agent.metadata_source(None),
            MetadataSource::File(_)
        ));
        for bad in [
            "rescan_secs = 0",
            "metadata_dir = \"rel\"",
            "nope = 1",
            "debounce_ms = 999999",
            "image_id_key = \"\"",
        ] {
            let err = c
                .merge_str(
                    &format!("[agent]\n{bad}\n"),
                    Path::new("/etc/imageupd/config.d/50-agent.toml"),
                )
                .unwrap_err();
            assert!(
                format!("{err:#}").contains("50-agent.toml"),
                "{bad}: {err:#}"
            );
        }
    }
}

/// The policy as a word, e.g. `kexec`.
pub fn policy_word(p: KernelPolicy) -> &'static str {
    match p {
        KernelPolicy::Kexec => "kexec",
        KernelPolicy::Reboot => "reboot",
        KernelPolicy::Defer => "defer",
    }
}

/// os-collect-config's default cache directory.
pub const DEFAULT_OCC_CACHE_DIR: &str = "/var/lib/os-collect-config";

/// Default dotted key of the target image id.
pub const DEFAULT_IMAGE_ID_KEY: &str = "image_id";

/// Default dotted key of the image source (store URL or directory).
pub const DEFAULT_IMAGE_SOURCE_KEY: &str = "image_source";

/// Where metadata comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataSource {
    /// os-collect-config's cache: the files listed by `$OS_CONFIG_FILES`
    /// when `env_files` is set, else by `<cache_dir>/os_config_files.json`,
    /// after os-apply-config's fallback files.
    Occ {
        /// The cache directory.
        cache_dir: PathBuf,
        /// The value of `$OS_CONFIG_FILES`, when set.
        env_files: Option<String>,
    },
    /// One plain JSON file holding an object.
    File(PathBuf),
}
