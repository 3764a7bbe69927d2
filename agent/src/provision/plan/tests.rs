//! The planner against expected offsets, and its refusals.

use super::*;
use crate::provision::scheme::parse;

const GIB: u64 = 1 << 30;

fn disk(size: u64, ss: u64) -> Inventory {
    Inventory {
        path: "/dev/null".into(),
        size_bytes: size,
        sector_size: ss,
    }
}

fn plan(text: &str, disks: &[Inventory]) -> Result<Plan, PlanError> {
    compile(&parse(text).expect("scheme parses"), disks, "seed")
}

/// (start MiB, size MiB) of every partition of disk 0.
fn spans(p: &Plan) -> Vec<(u64, u64)> {
    p.disks[0]
        .partitions
        .iter()
        .map(|x| (x.start_bytes / MIB, x.size_bytes / MIB))
        .collect()
}

const BASIC: &str = r#"
[[disk]]
name = "vda"
boot = true
[[disk.partition]]
role = "configdrive"
[[disk.partition]]
role = "esp"
size = "64MiB"
[[disk.partition]]
role = "root"
min = "100MiB"
"#;

#[test]
fn basic_gpt_512_and_4096_same_offsets() {
    for ss in [512, 4096] {
        let p = plan(BASIC, &[disk(GIB, ss)]).unwrap();
        // GPT: 1 MiB in front, the backup header takes the last MiB.
        assert_eq!(spans(&p), vec![(1, 64), (65, 894), (959, 64)], "ss {ss}");
        let roles: Vec<Role> = p.disks[0].partitions.iter().map(|x| x.role).collect();
        assert_eq!(roles, vec![Role::Esp, Role::Root, Role::Configdrive]);
        let cd = &p.disks[0].partitions[2];
        assert_eq!(cd.label.as_deref(), Some("config-2"));
        assert_eq!(cd.end_bytes(), 1023 * MIB);
        assert_eq!(p.disks[0].partitions[1].mount.as_deref(), Some("/"));
        assert_eq!(p.disks[0].partitions[0].mount.as_deref(), Some("/boot/efi"));
        for x in &p.disks[0].partitions {
            assert_eq!(x.start_bytes % ss, 0);
        }
    }
}

#[test]
fn mbr_uses_the_whole_disk() {
    let t = BASIC.replace("boot = true", "boot = true\ntable = \"mbr\"");
    let p = plan(&t, &[disk(GIB, 512)]).unwrap();
    assert_eq!(spans(&p), vec![(1, 64), (65, 895), (960, 64)]);
    assert!(p.disks[0].disk_id.starts_with("0x"));
    assert_eq!(p.disks[0].partitions[0].type_id, "ef");
    assert!(p.disks[0].partitions[0].part_uuid.is_none());
}

#[test]
fn weights_and_max() {
    let t = r#"
firmware = "bios"
[[disk]]
name = "a"
[[disk.partition]]
role = "root"
min = "100MiB"
weight = 3
[[disk.partition]]
role = "data"
mount = "/srv"
min = "100MiB"
weight = 1
"#;
    // 1 GiB: 1022 MiB usable, 822 free: 3/4 = 616.5 -> 616, 1/4 -> 205.
    let p = plan(t, &[disk(GIB, 512)]).unwrap();
    assert_eq!(spans(&p), vec![(1, 716), (717, 305)]);
    // A max caps root; data takes the rest.
    let capped = t.replace("weight = 3", "weight = 3\nmax = \"200MiB\"");
    let p = plan(&capped, &[disk(GIB, 512)]).unwrap();
    assert_eq!(spans(&p), vec![(1, 200), (201, 822)]);
}

#[test]
fn alignment_and_fixed_start() {
    let t = r#"
firmware = "bios"
[[disk]]
name = "a"
align_mib = 4
[[disk.partition]]
role = "swap"
size = "5MiB"
[[disk.partition]]
role = "root"
start = "64MiB"
size = "100MiB"
"#;
    let p = plan(t, &[disk(GIB, 4096)]).unwrap();
    // Swap rounds up to 8 MiB at 4 MiB; root where it was asked.
    assert_eq!(spans(&p), vec![(4, 8), (64, 100)]);
    let overlap = t.replace("start = \"64MiB\"", "start = \"8MiB\"");
    assert!(matches!(
        plan(&overlap, &[disk(GIB, 4096)]),
        Err(PlanError::Overlap { number: 2, .. })
    ));
    let unaligned = t.replace("start = \"64MiB\"", "start = \"65MiB\"");
    assert!(plan(&unaligned, &[disk(GIB, 4096)])
        .unwrap_err()
        .to_string()
        .contains("not a multiple of the alignment"));
}

#[test]
fn refusals() {
    let too_big = BASIC.replace("size = \"64MiB\"", "size = \"2GiB\"");
    let e = plan(&too_big, &[disk(GIB, 512)]).unwrap_err();
    assert!(matches!(e, PlanError::DoesNotFit { .. }), "{e}");
    assert!(e.to_string().contains("usable"), "{e}");
    let two_roots = format!("{BASIC}[[disk.partition]]\nrole = \"root\"\n");
    assert_eq!(
        plan(&two_roots, &[disk(GIB, 512)]),
        Err(PlanError::TwoRoots)
    );
    let no_esp = BASIC.replace("role = \"esp\"", "role = \"swap\"");
    assert_eq!(
        plan(&no_esp, &[disk(GIB, 512)]),
        Err(PlanError::NoEsp("vda".into()))
    );
    let bad_fs = BASIC.replace("size = \"64MiB\"", "size = \"64MiB\"\nfs = \"ext4\"");
    assert!(plan(&bad_fs, &[disk(GIB, 512)])
        .unwrap_err()
        .to_string()
        .contains("not allowed for this role"));
    assert_eq!(
        plan(BASIC, &[disk(GIB, 512), disk(GIB, 512)]),
        Err(PlanError::DiskCount {
            scheme: 1,
            given: 2
        })
    );
    let two_disks =
        format!("{BASIC}[[disk]]\nname = \"vdb\"\n[[disk.partition]]\nrole = \"configdrive\"\n");
    assert!(matches!(
        plan(&two_disks, &[disk(GIB, 512), disk(GIB, 512)]),
        Err(PlanError::Configdrive(_))
    ));
    let mbr5 = "firmware = \"bios\"\n[[disk]]\nname = \"a\"\ntable = \"mbr\"\n".to_string()
        + &"[[disk.partition]]\nrole = \"swap\"\nsize = \"1MiB\"\n".repeat(4)
        + "[[disk.partition]]\nrole = \"root\"\n";
    assert!(plan(&mbr5, &[disk(GIB, 512)])
        .unwrap_err()
        .to_string()
        .contains("4 primary"));
    assert!(plan(BASIC, &[disk(GIB, 520)]).is_err());
}

#[test]
fn uuids_follow_the_seed() {
    let s = parse(BASIC).unwrap();
    let a = compile(&s, &[disk(GIB, 512)], "one").unwrap();
    let b = compile(&s, &[disk(GIB, 512)], "one").unwrap();
    let c = compile(&s, &[disk(GIB, 512)], "two").unwrap();
    assert_eq!(a, b);
    assert_eq!(a.digest(), b.digest());
    assert_ne!(
        a.disks[0].partitions[1].fs_uuid,
        c.disks[0].partitions[1].fs_uuid
    );
    assert_ne!(a.digest(), c.digest());
    let u = a.disks[0].partitions[1].fs_uuid.clone().unwrap();
    assert_eq!(u.len(), 36);
    assert_eq!(&u[14..15], "4");
    let v = a.disks[0].partitions[0].fs_uuid.clone().unwrap();
    assert_eq!(v.len(), 9, "vfat id {v}");
    // The path does not enter the digest (loop numbers change).
    let mut d = disk(GIB, 512);
    d.path = "/dev/loop9".into();
    assert_eq!(compile(&s, &[d], "one").unwrap().digest(), a.digest());
}
