//! Compiling a [`Scheme`] against the real disks' inventory (size and
//! logical sector size) to a byte-offset plan: a pure function, so every
//! layout rule is unit-tested without root and `--dry-run --json` prints
//! exactly what would be written.
//!
//! Layout rules (after systemd-repart): partitions keep their order, a
//! configdrive always goes last at the aligned end of the boot disk; each
//! gets its minimum, then the space left over is shared by weight up to
//! each maximum; a fixed `start` splits the disk into segments shared
//! separately. GPT leaves room for both headers; all offsets are multiples
//! of the alignment (1 MiB by default). Partition, disk and filesystem
//! UUIDs derive from a seed, so a re-run with the same inputs plans the
//! same disk and converges.

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::scheme::{DiskSpec, Firmware, Fs, PartSpec, Role, Scheme, Table};

/// One MiB in bytes.
pub const MIB: u64 = 1 << 20;
/// Bytes of GPT partition entries (128 entries of 128 bytes).
pub const GPT_ENTRIES_BYTES: u64 = 16 * 1024;
/// Largest MBR disk addressable with 32-bit sector numbers, in sectors.
const MBR_MAX_SECTORS: u64 = 1 << 32;
/// The label cloud-init's ConfigDrive datasource looks for.
pub const CONFIG2_LABEL: &str = "config-2";

/// A real disk as the planner sees it.
#[derive(Clone, Debug, Serialize)]
pub struct Inventory {
    /// Device or image file path (for the plan's output only).
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical sector size in bytes (512 or 4096).
    pub sector_size: u64,
}

/// Why a scheme cannot be planned onto these disks.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No `[[disk]]`.
    #[error("the scheme names no disk")]
    NoDisks,
    /// `--disk` count differs from the scheme's.
    #[error("the scheme has {scheme} disk(s) but {given} --disk given")]
    DiskCount {
        /// Disks in the scheme.
        scheme: usize,
        /// Disks given.
        given: usize,
    },
    /// Two disks share a name.
    #[error("two disks are named {0:?}")]
    DuplicateDisk(String),
    /// No root partition.
    #[error("the scheme has no root partition")]
    NoRoot,
    /// More than one root partition.
    #[error("the scheme has more than one root partition")]
    TwoRoots,
    /// Not exactly one boot disk.
    #[error("exactly one disk must have boot = true (found {0})")]
    BootDisks(usize),
    /// UEFI boot disk without an ESP.
    #[error("disk {0:?} boots by UEFI but has no esp partition")]
    NoEsp(String),
    /// A configdrive off the boot disk or twice.
    #[error("{0}")]
    Configdrive(String),
    /// A role used with a filesystem it cannot have, or a bad mount/label.
    #[error("disk {disk:?} partition {number} ({role}): {what}")]
    Partition {
        /// Disk name.
        disk: String,
        /// 1-based partition number.
        number: usize,
        /// Its role.
        role: String,
        /// What is wrong.
        what: String,
    },
    /// Minimums larger than the disk.
    #[error("disk {disk:?} ({path}): the partitions need at least {need} bytes but {have} bytes are usable")]
    DoesNotFit {
        /// Disk name.
        disk: String,
        /// Its path.
        path: String,
        /// Bytes needed by the minimums (aligned).
        need: u64,
        /// Usable bytes.
        have: u64,
    },
    /// A fixed start inside the partition before it.
    #[error("disk {disk:?}: partition {number} starts at {start} bytes, inside the partitions before it (which end at {prev_end} at least)")]
    Overlap {
        /// Disk name.
        disk: String,
        /// 1-based partition number.
        number: usize,
        /// Its fixed start.
        start: u64,
        /// Where the ones before it end.
        prev_end: u64,
    },
    /// Sector size or alignment unusable.
    #[error("disk {disk:?}: {what}")]
    Geometry {
        /// Disk name.
        disk: String,
        /// What is wrong.
        what: String,
    },
}

/// The compiled plan for all disks.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Plan {
    /// How the node boots.
    pub firmware: Firmware,
    /// One per disk, in scheme order.
    pub disks: Vec<DiskPlan>,
}

/// One disk's plan.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DiskPlan {
    /// Scheme name.
    pub name: String,
    /// Device or file.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Logical sector size in bytes.
    pub sector_size: u64,
    /// Table type.
    pub table: Table,
    /// The boot disk.
    pub boot: bool,
    /// Alignment in bytes.
    pub align_bytes: u64,
    /// GPT disk GUID, or MBR disk id (`0x` and 8 hex digits).
    pub disk_id: String,
    /// Partitions in table order.
    pub partitions: Vec<PartPlan>,
}

/// One partition's plan.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct PartPlan {
    /// 1-based partition number.
    pub number: usize,
    /// Role.
    pub role: Role,
    /// First byte.
    pub start_bytes: u64,
    /// Length in bytes.
    pub size_bytes: u64,
    /// GPT type GUID or MBR type byte (hex).
    pub type_id: String,
    /// GPT partition GUID (none on MBR).
    pub part_uuid: Option<String>,
    /// GPT partition name.
    pub name: String,
    /// Filesystem, if any.
    pub fs: Option<Fs>,
    /// Filesystem UUID as blkid shows it (vfat: `XXXX-XXXX`).
    pub fs_uuid: Option<String>,
    /// Filesystem label.
    pub label: Option<String>,
    /// Mount point.
    pub mount: Option<String>,
}

impl PartPlan {
    /// One past the last byte.
    pub fn end_bytes(&self) -> u64 {
        self.start_bytes + self.size_bytes
    }
}

impl Plan {
    /// The boot disk.
    pub fn boot_disk(&self) -> &DiskPlan {
        // compile() guarantees exactly one.
        self.disks.iter().find(|d| d.boot).unwrap_or(&self.disks[0])
    }

    /// The partition of a role (the first one), with its disk.
    pub fn find(&self, role: Role) -> Option<(&DiskPlan, &PartPlan)> {
        self.disks
            .iter()
            .flat_map(|d| d.partitions.iter().map(move |p| (d, p)))
            .find(|(_, p)| p.role == role)
    }

    /// Digest of the plan without the disk paths (a loop device's number
    /// changes between runs; the layout does not): what the on-disk marker
    /// records, so a re-run knows it continues the same job.
    pub fn digest(&self) -> String {
        let mut p = self.clone();
        for d in &mut p.disks {
            d.path.clear();
        }
        let json = serde_json::to_vec(&p).unwrap_or_default();
        hex::encode(Sha256::digest(&json))
    }
}

/// A UUID (version 4 layout) derived from the seed and what it names.
pub fn derive_uuid(seed: &str, what: &str) -> String {
    let h = Sha256::digest(format!("imageupd-provision\0{seed}\0{what}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

/// Compile the scheme onto the disks (same order as `scheme.disks`).
pub fn compile(scheme: &Scheme, disks: &[Inventory], seed: &str) -> Result<Plan, PlanError> {
    check_scheme(scheme)?;
    if disks.len() != scheme.disks.len() {
        return Err(PlanError::DiskCount {
            scheme: scheme.disks.len(),
            given: disks.len(),
        });
    }
    let single = scheme.disks.len() == 1;
    let planned = scheme
        .disks
        .iter()
        .zip(disks)
        .map(|(spec, inv)| plan_disk(scheme.firmware, spec, single || spec.boot, inv, seed))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan {
        firmware: scheme.firmware,
        disks: planned,
    })
}

/// Rules across disks: names, one root, one boot disk, the configdrive.
fn check_scheme(s: &Scheme) -> Result<(), PlanError> {
    if s.disks.is_empty() {
        return Err(PlanError::NoDisks);
    }
    let mut names = std::collections::BTreeSet::new();
    for d in &s.disks {
        if !names.insert(d.name.as_str()) {
            return Err(PlanError::DuplicateDisk(d.name.clone()));
        }
    }
    let count = |r: Role| {
        s.disks
            .iter()
            .flat_map(|d| &d.partitions)
            .filter(|p| p.role == r)
            .count()
    };
    match count(Role::Root) {
        0 => return Err(PlanError::NoRoot),
        1 => {}
        _ => return Err(PlanError::TwoRoots),
    }
    let boots = s.disks.iter().filter(|d| d.boot).count();
    if boots > 1 || (boots == 0 && s.disks.len() > 1) {
        return Err(PlanError::BootDisks(boots));
    }
    if count(Role::Configdrive) > 1 {
        return Err(PlanError::Configdrive(
            "the scheme has more than one configdrive".into(),
        ));
    }
    for d in &s.disks {
        let is_boot = d.boot || s.disks.len() == 1;
        let has = |r: Role| d.partitions.iter().any(|p| p.role == r);
        if has(Role::Configdrive) && !is_boot {
            return Err(PlanError::Configdrive(format!(
                "the configdrive must be on the boot disk, not on {:?}",
                d.name
            )));
        }
        if is_boot && s.firmware == Firmware::Uefi && !has(Role::Esp) {
            return Err(PlanError::NoEsp(d.name.clone()));
        }
    }
    Ok(())
}

/// Plan one disk.
fn plan_disk(
    fw: Firmware,
    spec: &DiskSpec,
    boot: bool,
    inv: &Inventory,
    seed: &str,
) -> Result<DiskPlan, PlanError> {
    let geo = |what: String| PlanError::Geometry {
        disk: spec.name.clone(),
        what,
    };
    let ss = inv.sector_size;
    if !(512..=65536).contains(&ss) || !ss.is_power_of_two() {
        return Err(geo(format!("logical sector size {ss} is not supported")));
    }
    let align = spec.align_mib.unwrap_or(1).saturating_mul(MIB);
    if align == 0 || align % ss != 0 {
        return Err(geo(format!(
            "align_mib must be at least 1 and a multiple of the {ss}-byte sector"
        )));
    }
    let (first, end) = usable(spec.table, inv.size_bytes, ss, align);
    if spec.table == Table::Mbr && inv.size_bytes / ss > MBR_MAX_SECTORS {
        return Err(geo(format!(
            "an MBR table cannot address {} bytes with {ss}-byte sectors; use table = \"gpt\"",
            inv.size_bytes
        )));
    }
    if spec.table == Table::Mbr && spec.partitions.len() > 4 {
        return Err(geo(format!(
            "an MBR table holds 4 primary partitions, the scheme has {}",
            spec.partitions.len()
        )));
    }
    // Table order: as written, the configdrive last.
    let mut order: Vec<&PartSpec> = spec
        .partitions
        .iter()
        .filter(|p| p.role != Role::Configdrive)
        .collect();
    order.extend(
        spec.partitions
            .iter()
            .filter(|p| p.role == Role::Configdrive),
    );
    let mut sizing = Vec::with_capacity(order.len());
    for (i, p) in order.iter().enumerate() {
        check_part(fw, spec, i + 1, p)?;
        sizing.push(sizing_of(spec, i + 1, p, align)?);
    }
    let spans = layout(spec, inv, &sizing, first, end.max(first))?;
    let partitions = order
        .iter()
        .zip(spans)
        .enumerate()
        .map(|(i, (p, (start, size)))| part_plan(spec, seed, i + 1, p, start, size))
        .collect();
    let disk_id = match spec.table {
        Table::Gpt => derive_uuid(seed, &format!("disk/{}", spec.name)),
        Table::Mbr => format!(
            "0x{}",
            &derive_uuid(seed, &format!("disk/{}", spec.name))[..8]
        ),
    };
    Ok(DiskPlan {
        name: spec.name.clone(),
        path: inv.path.clone(),
        size_bytes: inv.size_bytes,
        sector_size: ss,
        table: spec.table,
        boot,
        align_bytes: align,
        disk_id,
        partitions,
    })
}

/// The aligned usable byte range `[first, end)` of a disk.
fn usable(table: Table, size: u64, ss: u64, align: u64) -> (u64, u64) {
    let round_up = |v: u64| v.div_ceil(align) * align;
    let round_down = |v: u64| v / align * align;
    match table {
        Table::Gpt => {
            let entries = GPT_ENTRIES_BYTES.div_ceil(ss);
            // Protective MBR + header + entries; backup entries + header.
            let head = (2 + entries) * ss;
            let tail = (1 + entries) * ss;
            (round_up(head), round_down(size.saturating_sub(tail)))
        }
        Table::Mbr => (round_up(ss), round_down(size)),
    }
}

/// The partition's plan entry.
fn part_plan(
    d: &DiskSpec,
    seed: &str,
    number: usize,
    p: &PartSpec,
    start: u64,
    size: u64,
) -> PartPlan {
    let what = |k: &str| format!("{}/{number}/{k}", d.name);
    let fs = p.fs.or(default_fs(p.role));
    let fs_uuid = fs.map(|f| {
        let u = derive_uuid(seed, &what("fs"));
        match f {
            Fs::Vfat => format!("{}-{}", &u[0..4], &u[4..8]).to_uppercase(),
            _ => u,
        }
    });
    let label = match p.role {
        Role::Configdrive => Some(CONFIG2_LABEL.to_string()),
        _ => p.label.clone().or(match p.role {
            Role::Root => Some("root".into()),
            Role::Esp => Some("ESP".into()),
            _ => None,
        }),
    };
    let mount = p.mount.clone().or(match p.role {
        Role::Root => Some("/".into()),
        Role::Esp => Some("/boot/efi".into()),
        _ => None,
    });
    PartPlan {
        number,
        role: p.role,
        start_bytes: start,
        size_bytes: size,
        type_id: type_id(d.table, p.role, fs),
        part_uuid: (d.table == Table::Gpt).then(|| derive_uuid(seed, &what("part"))),
        name: label.clone().unwrap_or_else(|| role_name(p.role).into()),
        fs,
        fs_uuid,
        label,
        mount,
    }
}

mod layout;
mod rules;

use layout::layout;
pub use rules::role_name;
use rules::{check_part, default_fs, sizing_of, type_id};

#[cfg(test)]
mod tests;
