//! The per-partition rules of the planner: which filesystems, mount
//! points and labels a role allows, its sizing, and the role tables
//! (default filesystem and size, GPT/MBR type ids). Pure.

use super::{PlanError, CONFIG2_LABEL, MIB};
use crate::provision::scheme::{DiskSpec, Firmware, Fs, PartSpec, Role, Table};

/// A partition's resolved sizing, in aligned bytes.
pub(super) struct Sizing {
    pub(super) min: u64,
    pub(super) max: u64,
    pub(super) weight: u64,
    pub(super) start: Option<u64>,
}

/// Role rules for one partition.
pub(super) fn check_part(
    fw: Firmware,
    d: &DiskSpec,
    number: usize,
    p: &PartSpec,
) -> Result<(), PlanError> {
    let bad = |what: String| PlanError::Partition {
        disk: d.name.clone(),
        number,
        role: role_name(p.role).into(),
        what,
    };
    let fs = p.fs.or(default_fs(p.role));
    let ok_fs = match p.role {
        Role::Esp | Role::Configdrive => fs == Some(Fs::Vfat),
        Role::BiosBoot => fs.is_none(),
        Role::Root => matches!(fs, Some(Fs::Ext4 | Fs::Xfs)),
        Role::Swap => fs == Some(Fs::Swap),
        Role::Data => matches!(fs, Some(Fs::Ext4 | Fs::Xfs | Fs::Vfat)),
    };
    if !ok_fs {
        return Err(bad(format!(
            "filesystem {fs:?} is not allowed for this role"
        )));
    }
    if p.role == Role::BiosBoot && d.table == Table::Mbr {
        return Err(bad("a bios-boot partition exists on GPT only".into()));
    }
    if p.role == Role::Esp && fw == Firmware::Bios && d.table == Table::Mbr && !d.boot {
        return Err(bad(
            "an ESP on a BIOS node's non-boot MBR disk is never used".into(),
        ));
    }
    if let Some(m) = &p.mount {
        if matches!(p.role, Role::Swap | Role::BiosBoot | Role::Configdrive) {
            return Err(bad("this role has no mount point".into()));
        }
        if !m.starts_with('/')
            || m.split('/').any(|c| c == ".." || c == ".")
            || m.contains(char::is_whitespace)
        {
            return Err(bad(format!(
                "mount point {m:?} must be an absolute path without . or .. or blanks"
            )));
        }
        if p.role == Role::Root && m != "/" {
            return Err(bad("the root is mounted at /".into()));
        }
    } else if p.role == Role::Data {
        return Err(bad("a data partition needs a mount point".into()));
    }
    if let Some(l) = &p.label {
        if p.role == Role::Configdrive && l != CONFIG2_LABEL {
            return Err(bad(format!("a configdrive is labelled {CONFIG2_LABEL:?}")));
        }
        let max = match fs {
            Some(Fs::Vfat) => 11,
            Some(Fs::Xfs) => 12,
            _ => 16,
        };
        if l.len() > max
            || !l
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(bad(format!(
                "label {l:?}: at most {max} characters of A-Z a-z 0-9 - _ ."
            )));
        }
    }
    Ok(())
}

/// A partition's aligned min, max, weight and fixed start.
pub(super) fn sizing_of(
    d: &DiskSpec,
    number: usize,
    p: &PartSpec,
    align: u64,
) -> Result<Sizing, PlanError> {
    let bad = |what: String| PlanError::Partition {
        disk: d.name.clone(),
        number,
        role: role_name(p.role).into(),
        what,
    };
    let up = |v: u64| v.div_ceil(align) * align;
    let (min, max, fixed) = match (p.size, p.min, p.max) {
        (Some(s), None, None) => (up(s.0), up(s.0), true),
        (Some(_), _, _) => return Err(bad("give size, or min/max, not both".into())),
        (None, min, max) => {
            let (dmin, fixed) = default_size(p.role);
            let min = min.map_or(dmin, |m| m.0);
            match (fixed, p.min.is_none() && max.is_none()) {
                (true, true) => (up(min), up(min), true),
                _ => (up(min), max.map_or(u64::MAX, |m| up(m.0)), false),
            }
        }
    };
    if min == 0 {
        return Err(bad("size must be above 0".into()));
    }
    if max < min {
        return Err(bad(format!("max {max} is below min {min}")));
    }
    let start = match p.start {
        Some(s) if s.0 % align != 0 => {
            return Err(bad(format!(
                "start {} is not a multiple of the alignment {align}",
                s.0
            )))
        }
        Some(s) => Some(s.0),
        None => None,
    };
    let weight = p.weight.map_or(if fixed { 0 } else { 1000 }, u64::from);
    Ok(Sizing {
        min,
        max,
        weight,
        start,
    })
}

/// The role's name as written in a scheme.
pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Esp => "esp",
        Role::BiosBoot => "bios-boot",
        Role::Root => "root",
        Role::Swap => "swap",
        Role::Data => "data",
        Role::Configdrive => "configdrive",
    }
}

/// Filesystem by role when the scheme names none.
pub(super) fn default_fs(r: Role) -> Option<Fs> {
    match r {
        Role::Esp | Role::Configdrive => Some(Fs::Vfat),
        Role::BiosBoot => None,
        Role::Root | Role::Data => Some(Fs::Ext4),
        Role::Swap => Some(Fs::Swap),
    }
}

/// Default (bytes, fixed?) size by role when the scheme gives none.
fn default_size(r: Role) -> (u64, bool) {
    match r {
        Role::Esp => (128 * MIB, true),
        Role::BiosBoot => (MIB, true),
        Role::Configdrive => (64 * MIB, true),
        Role::Swap => (1024 * MIB, true),
        Role::Root => (1024 * MIB, false),
        Role::Data => (16 * MIB, false),
    }
}

/// GPT type GUID or MBR type byte of a role.
pub(super) fn type_id(t: Table, r: Role, fs: Option<Fs>) -> String {
    match t {
        Table::Gpt => match r {
            Role::Esp => "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
            Role::BiosBoot => "21686148-6449-6E6F-744E-656564454649",
            Role::Root => "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            Role::Swap => "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
            Role::Data | Role::Configdrive => "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        }
        .to_string(),
        Table::Mbr => match (r, fs) {
            (Role::Esp, _) => "ef",
            (Role::Swap, _) => "82",
            (_, Some(Fs::Vfat)) => "0c",
            _ => "83",
        }
        .to_string(),
    }
}
