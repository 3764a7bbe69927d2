//! The node's `/etc/fstab`, by filesystem UUID, from the plan. Pure.
//! (`/etc/fstab` is on the update contract's preserve list, so later
//! updates in place keep it.)

use super::plan::Plan;
use super::scheme::{Fs, Role};

/// The fstab text: root first, then the other mounts by depth, then swap.
pub fn fstab(plan: &Plan) -> String {
    let mut rows: Vec<(usize, String)> = Vec::new();
    for d in &plan.disks {
        for p in &d.partitions {
            let (Some(fs), Some(uuid)) = (p.fs, p.fs_uuid.as_deref()) else {
                continue;
            };
            if p.role == Role::Configdrive {
                continue;
            }
            let row = match (fs, p.mount.as_deref()) {
                (Fs::Swap, _) => (usize::MAX, format!("UUID={uuid} none swap sw 0 0")),
                (_, Some(m)) => {
                    let depth = if m == "/" { 0 } else { m.matches('/').count() };
                    let (opts, pass) = match (fs, p.role) {
                        (_, Role::Root) => ("errors=remount-ro", 1),
                        (Fs::Vfat, _) => ("umask=0077", 2),
                        _ => ("defaults", 2),
                    };
                    (
                        depth,
                        format!(
                            "UUID={uuid} {m} {} {opts} 0 {pass}",
                            super::mkfs::fstype(fs)
                        ),
                    )
                }
                (_, None) => continue,
            };
            rows.push(row);
        }
    }
    rows.sort_by_key(|r| r.0);
    let mut s = String::from("# written by imageupd provision: filesystems by UUID\n");
    for (_, r) in rows {
        s.push_str(&r);
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::plan::{compile, Inventory};

    #[test]
    fn by_uuid_root_first() {
        let s = crate::provision::scheme::parse(
            "[[disk]]\nname = \"a\"\n[[disk.partition]]\nrole = \"esp\"\n[[disk.partition]]\nrole = \"swap\"\n[[disk.partition]]\nrole = \"data\"\nmount = \"/srv/x\"\n[[disk.partition]]\nrole = \"root\"\n[[disk.partition]]\nrole = \"configdrive\"\n",
        )
        .unwrap();
        let inv = Inventory {
            path: "x".into(),
            size_bytes: 8 << 30,
            sector_size: 512,
        };
        let p = compile(&s, &[inv], "seed").unwrap();
        let t = fstab(&p);
        let lines: Vec<&str> = t.lines().skip(1).collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].ends_with(" / ext4 errors=remount-ro 0 1"), "{t}");
        assert!(lines[1].contains(" /boot/efi vfat umask=0077 0 2"), "{t}");
        assert!(lines[2].contains(" /srv/x ext4 defaults 0 2"), "{t}");
        assert!(lines[3].ends_with(" none swap sw 0 0"), "{t}");
        let root = p.find(Role::Root).unwrap().1.fs_uuid.clone().unwrap();
        assert!(lines[0].starts_with(&format!("UUID={root} ")));
    }
}
