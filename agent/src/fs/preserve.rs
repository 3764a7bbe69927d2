//! The preserve list: node-local paths an apply never creates, modifies or
//! deletes (SPEC §4), matched like anchored rsync excludes.
//!
//! A pattern is an absolute path whose components may contain `*` and `?`
//! globs. A path is preserved when a pattern matches it or one of its
//! ancestors, so `/var/log/` covers everything below `/var/log`.

use crate::format::manifest::RelPath;

/// The default preserve list of SPEC §4.
pub const DEFAULT_PRESERVE: &[&str] = &[
    "/etc/image_id",
    "/etc/machine-id",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/fstab",
    "/etc/ssh/ssh_host_*",
    "/etc/imageupd/",
    "/var/lib/imageupd/",
    "/var/lib/os-collect-config/",
    "/var/log/",
    "/home/",
    "/root/",
    "/tmp/",
    "/var/tmp/",
    "/mnt/state/",
    "/lost+found",
];

/// A compiled preserve list.
#[derive(Clone, Debug, Default)]
pub struct Preserve {
    patterns: Vec<Vec<Vec<u8>>>,
    sources: Vec<String>,
}

impl Preserve {
    /// Compile patterns; each must be absolute and free of `.`/`..`.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self, String> {
        let mut p = Preserve::default();
        for s in patterns {
            p.add(s.as_ref())?;
        }
        Ok(p)
    }

    /// The default list plus the running kernel's module directories, which
    /// must survive until the node has booted another kernel.
    pub fn defaults_for_kernel(running_release: Option<&str>) -> Self {
        let mut list: Vec<String> = DEFAULT_PRESERVE.iter().map(|s| s.to_string()).collect();
        if let Some(r) = running_release {
            if !r.is_empty() && !r.contains('/') {
                list.push(format!("/lib/modules/{r}/"));
                list.push(format!("/usr/lib/modules/{r}/"));
            }
        }
        // The defaults are well-formed; a failure here is a programming error
        // caught by the unit tests.
        Preserve::new(&list).unwrap_or_default()
    }

    /// Add one pattern.
    pub fn add(&mut self, pattern: &str) -> Result<(), String> {
        let t = pattern.trim();
        if !t.starts_with('/') {
            return Err(format!(
                "preserve pattern {pattern:?} must be an absolute path"
            ));
        }
        let comps: Vec<Vec<u8>> = t
            .trim_matches('/')
            .split('/')
            .filter(|c| !c.is_empty())
            .map(|c| c.as_bytes().to_vec())
            .collect();
        if comps.is_empty() {
            return Err(format!(
                "preserve pattern {pattern:?} would preserve the whole root"
            ));
        }
        if comps.iter().any(|c| c == b"." || c == b"..") {
            return Err(format!("preserve pattern {pattern:?} contains '.' or '..'"));
        }
        self.patterns.push(comps);
        self.sources.push(t.to_string());
        Ok(())
    }

    /// The patterns as given, for reports and the rsync oracle.
    pub fn patterns(&self) -> &[String] {
        &self.sources
    }

    /// True when `path` or one of its ancestors is preserved.
    pub fn matches(&self, path: &RelPath) -> bool {
        if path.is_root() {
            return false;
        }
        // Asked once per entry of every plan: no allocation.
        let comps = || path.as_bytes().split(|&b| b == b'/');
        let n = path.as_bytes().iter().filter(|&&b| b == b'/').count() + 1;
        self.patterns
            .iter()
            .any(|pat| pat.len() <= n && pat.iter().zip(comps()).all(|(p, c)| glob(p, c)))
    }

    /// True when something below `dir` (but not `dir` itself) is preserved,
    /// i.e. the directory cannot simply be removed or replaced.
    pub fn has_preserved_below(&self, dir: &RelPath) -> bool {
        let comps: Vec<&[u8]> = if dir.is_root() {
            Vec::new()
        } else {
            dir.as_bytes().split(|&b| b == b'/').collect()
        };
        self.patterns
            .iter()
            .any(|pat| pat.len() > comps.len() && pat.iter().zip(&comps).all(|(p, c)| glob(p, c)))
    }
}

/// Shell-style glob on one path component: `*` any run, `?` one byte.
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let (mut star, mut mark) = (None, 0usize);
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    #[test]
    fn defaults_match_spec_paths() {
        let p = Preserve::defaults_for_kernel(Some("6.1.0-50-cloud-amd64"));
        for yes in [
            "etc/image_id",
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_host_rsa_key.pub",
            "var/log",
            "var/log/apt/history.log",
            "var/lib/imageupd/stage/1",
            "home",
            "lost+found",
            "lib/modules/6.1.0-50-cloud-amd64/kernel/x.ko",
            "usr/lib/modules/6.1.0-50-cloud-amd64",
        ] {
            assert!(p.matches(&rp(yes)), "{yes}");
        }
        for no in [
            "etc",
            "etc/ssh",
            "etc/ssh/sshd_config",
            "var",
            "var/lib",
            "var/logs",
            "etc/image_id2",
            "lib/modules/6.1.0-47-cloud-amd64",
        ] {
            assert!(!p.matches(&rp(no)), "{no}");
        }
        assert!(!p.matches(&RelPath::root()));
    }

    #[test]
    fn preserved_below() {
        let p = Preserve::defaults_for_kernel(None);
        assert!(p.has_preserved_below(&rp("etc")));
        assert!(p.has_preserved_below(&rp("etc/ssh")));
        assert!(p.has_preserved_below(&RelPath::root()));
        assert!(!p.has_preserved_below(&rp("usr")));
    }

    #[test]
    fn rejects_bad_patterns() {
        assert!(Preserve::new(&["etc/x"]).is_err());
        assert!(Preserve::new(&["/"]).is_err());
        assert!(Preserve::new(&["/a/../b"]).is_err());
    }

    #[test]
    fn globs() {
        assert!(glob(b"ssh_host_*", b"ssh_host_"));
        assert!(glob(b"a*b*c", b"axxbyyc"));
        assert!(!glob(b"a*b*c", b"axxbyy"));
        assert!(glob(b"?x", b"ax"));
        assert!(!glob(b"?x", b"x"));
    }
}
