//! The partitioning scheme an operator writes (TOML, or JSON when the
//! text starts with `{`): disks, their partitions by role, sizes and
//! weights. Parsing only: no I/O, no knowledge of the real disks (that is
//! [`super::plan`]).
//!
//! ```toml
//! firmware = "uefi"          # or "bios"
//! [[disk]]
//! name = "vda"               # matched by `--disk vda=PATH`, else by order
//! table = "gpt"              # or "mbr"
//! boot = true
//! align_mib = 1
//! [[disk.partition]]
//! role = "esp"
//! size = "64MiB"
//! [[disk.partition]]
//! role = "root"
//! min = "1GiB"
//! weight = 1000
//! [[disk.partition]]
//! role = "configdrive"
//! size = "64MiB"
//! ```

use serde::{Deserialize, Serialize};

/// Why a scheme text was refused.
#[derive(Debug, thiserror::Error)]
pub enum SchemeError {
    /// Not valid TOML for the scheme.
    #[error("scheme is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    /// Not valid JSON for the scheme.
    #[error("scheme is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// How the node's firmware boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// UEFI: the boot disk needs an ESP.
    #[default]
    Uefi,
    /// Legacy BIOS.
    Bios,
}

/// Partition table type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    /// GUID partition table.
    #[default]
    Gpt,
    /// DOS/MBR table (at most 4 primary partitions).
    Mbr,
}

/// What a partition is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// EFI system partition (vfat).
    Esp,
    /// GRUB's BIOS boot partition on GPT (no filesystem).
    BiosBoot,
    /// The root filesystem the image is applied to.
    Root,
    /// Swap space.
    Swap,
    /// Another filesystem (e.g. /srv), created empty.
    Data,
    /// cloud-init's config-2 drive (vfat), placed at the end of the boot disk.
    Configdrive,
}

/// Filesystem to make on a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Fs {
    /// ext4.
    Ext4,
    /// XFS.
    Xfs,
    /// FAT32 (FAT16 below 256 MiB... as mkfs.vfat chooses).
    Vfat,
    /// Swap signature.
    Swap,
}

/// A size in bytes, written as an integer or as `"64MiB"`, `"1GiB"`,
/// `"512KiB"`, `"2TiB"` (binary units only: no ambiguity).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Parse `"64MiB"` and friends (see [`Size`]).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("size {s:?}: expected a number followed by B, KiB, MiB, GiB or TiB")
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        u => {
            return Err(format!(
                "size {s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// The whole scheme.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scheme {
    /// How the node boots (default UEFI).
    #[serde(default)]
    pub firmware: Firmware,
    /// Seed of the deterministic disk, partition and filesystem UUIDs
    /// (default: derived by the caller from the node's inputs), so that a
    /// re-run with the same inputs plans the same disk.
    #[serde(default)]
    pub seed: Option<String>,
    /// Kernel command line after `root=UUID=…` (default `ro`).
    #[serde(default)]
    pub cmdline: Option<String>,
    /// The disks, in `--disk` order.
    #[serde(rename = "disk", default)]
    pub disks: Vec<DiskSpec>,
}

/// One disk of the scheme.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Name (matched by `--disk NAME=PATH`).
    pub name: String,
    /// Partition table type.
    #[serde(default)]
    pub table: Table,
    /// The disk the firmware boots (bootloader, configdrive).
    #[serde(default)]
    pub boot: bool,
    /// Partition alignment in MiB (default 1).
    #[serde(default)]
    pub align_mib: Option<u64>,
    /// Partitions in disk order (a configdrive always goes last).
    #[serde(rename = "partition", default)]
    pub partitions: Vec<PartSpec>,
}

/// One partition of a disk.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PartSpec {
    /// What it is for.
    pub role: Role,
    /// Fixed size (same as min = max = size).
    #[serde(default)]
    pub size: Option<Size>,
    /// Smallest size.
    #[serde(default)]
    pub min: Option<Size>,
    /// Largest size (default: no limit).
    #[serde(default)]
    pub max: Option<Size>,
    /// Share of the space left over after every minimum (default 0 for a
    /// fixed size, 1000 otherwise).
    #[serde(default)]
    pub weight: Option<u32>,
    /// Fixed start offset from the beginning of the disk (optional; must
    /// not overlap the partition before it).
    #[serde(default)]
    pub start: Option<Size>,
    /// Filesystem (default by role: esp/configdrive vfat, root/data ext4,
    /// swap swap, bios-boot none).
    #[serde(default)]
    pub fs: Option<Fs>,
    /// Mount point (default: `/` for root, `/boot/efi` for the ESP).
    #[serde(default)]
    pub mount: Option<String>,
    /// Partition and filesystem label (configdrive: always `config-2`).
    #[serde(default)]
    pub label: Option<String>,
}

/// Parse a scheme: JSON when it starts with `{`, else TOML.
pub fn parse(text: &str) -> Result<Scheme, SchemeError> {
    if text.trim_start().starts_with('{') {
        Ok(serde_json::from_str(text)?)
    } else {
        Ok(toml::from_str(text)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1GB").unwrap_err().contains("unknown unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB")
            .unwrap_err()
            .contains("overflows"));
    }

    #[test]
    fn toml_and_json() {
        let t = parse(
            "[[disk]]\nname = \"vda\"\nboot = true\n[[disk.partition]]\nrole = \"esp\"\nsize = \"64MiB\"\n[[disk.partition]]\nrole = \"root\"\nmin = 1073741824\n",
        )
        .unwrap();
        assert_eq!(t.disks[0].partitions[0].role, Role::Esp);
        assert_eq!(t.disks[0].partitions[0].size, Some(Size(64 << 20)));
        assert_eq!(t.disks[0].partitions[1].min, Some(Size(1 << 30)));
        let j = parse(r#"{"disk":[{"name":"a","table":"mbr","partition":[{"role":"bios-boot","size":"1MiB"}]}]}"#)
            .unwrap();
        assert_eq!(j.disks[0].table, Table::Mbr);
        assert_eq!(j.disks[0].partitions[0].role, Role::BiosBoot);
    }

    #[test]
    fn unknown_role_and_key_refused() {
        let e = parse("[[disk]]\nname = \"a\"\n[[disk.partition]]\nrole = \"home\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown variant `home`"), "{e}");
        let e = parse("[[disk]]\nname = \"a\"\nsize = 3\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `size`"), "{e}");
    }
}
