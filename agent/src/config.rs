//! Node configuration: `etc/imageupd/config.toml`, then
//! `etc/imageupd/config.d/*.toml` in name order, later files overriding
//! earlier ones key by key. Unknown keys are errors that name the file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::preserve::{Preserve, DEFAULT_PRESERVE};

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
            _ => Err(format!("unknown kernel policy {s:?} (expected kexec, reboot or defer)")),
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
    /// Extra CA certificate(s) (PEM) for `https://` sources, a path on the node.
    pub ca_file: Option<PathBuf>,
    /// Files that contributed, in order.
    pub sources: Vec<PathBuf>,
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
            ca_file: None,
            sources: Vec::new(),
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
    ca_file: Option<PathBuf>,
}

impl Config {
    /// Parse one fragment's text over `self`.
    pub fn merge_str(&mut self, text: &str, origin: &Path) -> Result<()> {
        let f: Fragment = toml::from_str(text).with_context(|| format!("invalid configuration in {}", origin.display()))?;
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
            Preserve::new(&v).map_err(anyhow::Error::msg).with_context(|| format!("{}: key preserve", origin.display()))?;
            self.preserve = v;
        }
        if let Some(v) = f.preserve_extra {
            Preserve::new(&v).map_err(anyhow::Error::msg).with_context(|| format!("{}: key preserve_extra", origin.display()))?;
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
        if let Some(v) = f.ca_file {
            self.ca_file = Some(v);
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
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        frags.sort();
        for f in frags {
            let t = std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            c.merge_str(&t, &f)?;
        }
        Ok(c)
    }

    /// Worker threads to use.
    pub fn threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_override_and_errors_name_the_file() {
        let mut c = Config::default();
        c.merge_str("allow_unsigned = true\nhook_timeout_secs = 5\n", Path::new("a.toml")).unwrap();
        c.merge_str("hook_timeout_secs = 7\npreserve_extra = [\"/srv/data/\"]\n", Path::new("b.toml")).unwrap();
        assert!(c.allow_unsigned);
        assert_eq!(c.hook_timeout_secs, 7);
        assert!(c.preserve.iter().any(|p| p == "/srv/data/"));
        let err = c.merge_str("bogus = 1\n", Path::new("/etc/imageupd/config.d/10-x.toml")).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("10-x.toml") && msg.contains("bogus"), "{msg}");
        let err = c.merge_str("preserve = [\"relative\"]\n", Path::new("p.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("p.toml"));
        let err = c.merge_str("kernel_policy = \"yolo\"\n", Path::new("k.toml")).unwrap_err();
        assert!(format!("{err:#}").contains("k.toml"));
    }
}
