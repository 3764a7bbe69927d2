//! Kernel identity: which kernel an image boots, and whether applying it
//! means the node must boot a different kernel.
//!
//! Pure functions over manifests; the running release is passed in.

use std::collections::HashMap;

use crate::format::manifest::{Entry, FileType, KernelInfo, RelPath};

/// Find the image's kernel: a release with a `lib/modules/<release>`
/// directory and a matching `boot/vmlinuz-<release>`. When several exist,
/// the one the `vmlinuz` symlink (top level or in `boot/`) points at wins,
/// else the highest version.
pub fn detect(entries: &[Entry]) -> Option<KernelInfo> {
    let by_path: HashMap<&[u8], &Entry> = entries.iter().map(|e| (e.path.as_bytes(), e)).collect();
    let mut releases: Vec<String> = Vec::new();
    for e in entries {
        if e.ftype != FileType::Dir {
            continue;
        }
        let p = e.path.as_bytes();
        for prefix in [&b"lib/modules/"[..], b"usr/lib/modules/"] {
            if let Some(rest) = p.strip_prefix(prefix) {
                if !rest.is_empty() && !rest.contains(&b'/') {
                    if let Ok(r) = std::str::from_utf8(rest) {
                        if !releases.iter().any(|x| x == r) {
                            releases.push(r.to_string());
                        }
                    }
                }
            }
        }
    }
    // Resolve hardlinks and symlinks inside boot/ to the file entry.
    let file_of = |rel: &str| -> Option<&Entry> {
        let mut e = *by_path.get(rel.as_bytes())?;
        for _ in 0..8 {
            match e.ftype {
                FileType::File => return Some(e),
                FileType::Hardlink => e = by_path.get(e.target.as_ref()?.0.as_slice())?,
                FileType::Symlink => {
                    let t = &e.target.as_ref()?.0;
                    let resolved = resolve_link(&e.path, t)?;
                    e = by_path.get(resolved.as_bytes())?;
                }
                _ => return None,
            }
        }
        None
    };
    let with_vmlinuz: Vec<&String> = releases
        .iter()
        .filter(|r| file_of(&format!("boot/vmlinuz-{r}")).is_some())
        .collect();
    if with_vmlinuz.is_empty() {
        return None;
    }
    let preferred = ["vmlinuz", "boot/vmlinuz"].iter().find_map(|l| {
        let e = by_path.get(l.as_bytes())?;
        let t = e.target.as_ref()?;
        let name = t.0.rsplit(|&b| b == b'/').next()?;
        let r = std::str::from_utf8(name.strip_prefix(b"vmlinuz-")?).ok()?;
        with_vmlinuz.iter().find(|x| x.as_str() == r).copied()
    });
    let release = match preferred {
        Some(r) => r.clone(),
        None => with_vmlinuz
            .iter()
            .max_by(|a, b| version_cmp(a, b))
            .map(|s| s.to_string())?,
    };
    let vm = file_of(&format!("boot/vmlinuz-{release}"));
    let rd = file_of(&format!("boot/initrd.img-{release}"));
    Some(KernelInfo {
        release,
        vmlinuz: vm.map(|e| e.path.clone()),
        vmlinuz_sha256: vm.and_then(|e| e.sha256),
        initrd: rd.map(|e| e.path.clone()),
        initrd_sha256: rd.and_then(|e| e.sha256),
    })
}

/// Resolve a symlink target relative to the link's directory, lexically,
/// inside the image. `None` if it escapes.
fn resolve_link(link: &RelPath, target: &[u8]) -> Option<String> {
    let parent = link
        .parent()
        .filter(|p| !p.is_root() && !target.starts_with(b"/"));
    let mut parts: Vec<&[u8]> = Vec::new();
    if let Some(parent) = &parent {
        parts.extend(parent.as_bytes().split(|&b| b == b'/'));
    }
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    String::from_utf8(parts.join(&b'/')).ok()
}

/// Compare kernel release strings by their numeric runs ("6.1.0-50" > "6.1.0-9").
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn key(s: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut num = String::new();
        let mut txt = String::new();
        for ch in s.chars() {
            if ch.is_ascii_digit() {
                if !txt.is_empty() {
                    out.push((0, std::mem::take(&mut txt)));
                }
                num.push(ch);
            } else {
                if !num.is_empty() {
                    out.push((num.parse().unwrap_or(u64::MAX), String::new()));
                    num.clear();
                }
                txt.push(ch);
            }
        }
        if !num.is_empty() {
            out.push((num.parse().unwrap_or(u64::MAX), String::new()));
        }
        if !txt.is_empty() {
            out.push((0, txt));
        }
        out
    }
    key(a).cmp(&key(b))
}

/// Why the kernel counts as changed, or `None` when it does not.
pub fn change_reason(
    target: Option<&KernelInfo>,
    current: Option<&KernelInfo>,
    running_release: Option<&str>,
) -> Option<String> {
    let t = target?;
    if let Some(r) = running_release {
        if r != t.release {
            return Some(format!(
                "running kernel {r} differs from the image's {}",
                t.release
            ));
        }
    }
    match current {
        None if running_release.is_none() => Some(format!(
            "the root has no recorded kernel; the image boots {}",
            t.release
        )),
        None => None,
        // The root's image boots another release, but the node still runs
        // the target's (a change that was deferred, then rolled back): the
        // current image says nothing about the running kernel's files.
        Some(c) if c.release != t.release && running_release.is_some() => None,
        Some(c) => {
            if c.release != t.release {
                Some(format!(
                    "kernel release changes from {} to {}",
                    c.release, t.release
                ))
            } else if c.vmlinuz_sha256 != t.vmlinuz_sha256 {
                Some(format!("vmlinuz of {} changed", t.release))
            } else if c.initrd_sha256 != t.initrd_sha256 {
                Some(format!("initrd of {} changed", t.release))
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::manifest::{Digest, RawBytes, Xattrs};

    fn e(p: &str, t: FileType, target: Option<&str>, content: &[u8]) -> Entry {
        Entry {
            path: RelPath(p.as_bytes().to_vec()),
            ftype: t,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: if t == FileType::File {
                content.len() as u64
            } else {
                0
            },
            sha256: (t == FileType::File).then(|| Digest::of(content)),
            target: target.map(|s| RawBytes(s.as_bytes().to_vec())),
            rdev: None,
            xattrs: Xattrs::new(),
        }
    }

    fn tree(extra: Vec<Entry>) -> Vec<Entry> {
        let mut v = vec![
            e(".", FileType::Dir, None, b""),
            e("boot", FileType::Dir, None, b""),
            e(
                "boot/initrd.img-6.1.0-47-cloud-amd64",
                FileType::File,
                None,
                b"i47",
            ),
            e(
                "boot/initrd.img-6.1.0-50-cloud-amd64",
                FileType::File,
                None,
                b"i50",
            ),
            e(
                "boot/vmlinuz-6.1.0-47-cloud-amd64",
                FileType::File,
                None,
                b"k47",
            ),
            e(
                "boot/vmlinuz-6.1.0-50-cloud-amd64",
                FileType::File,
                None,
                b"k50",
            ),
            e(
                "usr/lib/modules/6.1.0-47-cloud-amd64",
                FileType::Dir,
                None,
                b"",
            ),
            e(
                "usr/lib/modules/6.1.0-50-cloud-amd64",
                FileType::Dir,
                None,
                b"",
            ),
        ];
        v.extend(extra);
        v
    }

    #[test]
    fn picks_highest_or_symlinked() {
        let k = detect(&tree(vec![])).unwrap();
        assert_eq!(k.release, "6.1.0-50-cloud-amd64");
        assert_eq!(k.vmlinuz_sha256, Some(Digest::of(b"k50")));
        assert_eq!(k.initrd_sha256, Some(Digest::of(b"i50")));
        let k = detect(&tree(vec![e(
            "vmlinuz",
            FileType::Symlink,
            Some("boot/vmlinuz-6.1.0-47-cloud-amd64"),
            b"",
        )]))
        .unwrap();
        assert_eq!(k.release, "6.1.0-47-cloud-amd64");
    }

    #[test]
    fn no_kernel_in_minbase() {
        assert!(detect(&[e(".", FileType::Dir, None, b"")]).is_none());
    }

    #[test]
    fn change_detection() {
        let a = detect(&tree(vec![])).unwrap();
        let mut b = a.clone();
        assert!(change_reason(Some(&a), Some(&b), Some("6.1.0-50-cloud-amd64")).is_none());
        b.initrd_sha256 = Some(Digest::of(b"other"));
        assert!(change_reason(Some(&a), Some(&b), None)
            .unwrap()
            .contains("initrd"));
        assert!(
            change_reason(Some(&a), Some(&a), Some("6.1.0-47-cloud-amd64"))
                .unwrap()
                .contains("running kernel")
        );
        assert!(change_reason(None, Some(&a), Some("x")).is_none());
        assert!(version_cmp("6.1.0-50", "6.1.0-9").is_gt());
        // Rolling back to the running kernel after a deferred change.
        let mut old = a.clone();
        old.release = "6.1.0-47-cloud-amd64".into();
        assert!(change_reason(Some(&old), Some(&a), Some("6.1.0-47-cloud-amd64")).is_none());
        assert!(change_reason(Some(&old), Some(&a), None)
            .unwrap()
            .contains("from 6.1.0-50-cloud-amd64 to 6.1.0-47"));
    }
}
