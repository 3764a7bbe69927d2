//! The contract's preserve list, as the oracles see it.

use std::sync::OnceLock;

/// The paths of `imageupd provision`'s cloud-init preserve fragment
/// (agent/src/provision/configdrive.rs), as the oracles exclude them after
/// an update in place of a provisioned node.
pub const CLOUD_INIT_KEPT: &[&str] = &[
    "/var/lib/cloud/",
    "/etc/network/interfaces.d/50-cloud-init",
    "/etc/udev/rules.d/70-persistent-net.rules",
    "/etc/sudoers.d/90-cloud-init-users",
    "/etc/passwd",
    "/etc/passwd-",
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/group",
    "/etc/group-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/subuid",
    "/etc/subuid-",
    "/etc/subgid",
    "/etc/subgid-",
];

/// `uname -r`.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .expect("read osrelease")
        .trim()
        .to_string()
}

/// The contract's preserve list, as rsync exclude patterns anchored at the
/// transfer root, plus the engine's runtime directory `/run/imageupd/`
/// (its lock lives there when the root is a plain directory).
pub fn preserve_excludes() -> Vec<String> {
    let k = kernel_release();
    let mut v: Vec<String> = [
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
        "/run/imageupd/",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("/lib/modules/{k}/"));
    v.push(format!("/usr/lib/modules/{k}/"));
    v
}

/// True when the relative path (no leading slash; "." is the top) is on the
/// preserve list (see [`preserve_excludes`]).
pub fn is_preserved(rel: &[u8]) -> bool {
    static DIRS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(|| {
        let k = kernel_release();
        let mut d: Vec<Vec<u8>> = [
            "etc/imageupd",
            "var/lib/imageupd",
            "var/lib/os-collect-config",
            "var/log",
            "home",
            "root",
            "tmp",
            "var/tmp",
            "mnt/state",
            "run/imageupd",
            "lost+found",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        d.push(format!("lib/modules/{k}").into_bytes());
        d.push(format!("usr/lib/modules/{k}").into_bytes());
        d
    });
    const FILES: [&[u8]; 5] = [
        b"etc/image_id",
        b"etc/machine-id",
        b"etc/hostname",
        b"etc/hosts",
        b"etc/fstab",
    ];
    if FILES.contains(&rel) || rel.starts_with(b"etc/ssh/ssh_host_") {
        return true;
    }
    dirs.iter()
        .any(|d| rel == d.as_slice() || (rel.starts_with(d) && rel.get(d.len()) == Some(&b'/')))
}

/// The staging/state area the engine may use freely.
pub fn is_state(rel: &[u8]) -> bool {
    rel == b"var/lib/imageupd" || rel.starts_with(b"var/lib/imageupd/")
}
