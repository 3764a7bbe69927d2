//! The whole-disk image an image was published from, as the signed
//! manifest records it (`disk` in the manifest's head): what
//! `provision --whole-disk` streams and checks in-stream.
//!
//! ```json
//! "disk":{"file":"node.raw","format":"raw","size":1073741824,"sha256":"…"}
//! ```
//!
//! The file lives at `STORE/disks/<id>/<file>` ([`DiskArtifact::store_path`]);
//! the `SHA256SUMS` beside it (for Ironic) carries the same digest but no
//! signature. Pure: validation only.

use serde::{Deserialize, Serialize};

use super::values::Digest;

/// Directory of published disk images inside a store.
pub const DISKS_DIR: &str = "disks";
/// Name of the (unsigned, Ironic-format) checksum file next to a published
/// disk image; never a disk image's own name.
pub const SHA256SUMS: &str = "SHA256SUMS";
/// Longest disk image file name accepted, in bytes.
pub const MAX_DISK_NAME: usize = 255;

/// A disk image's container format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A plain sector-for-sector image.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl DiskFormat {
    /// The name Ironic's `disk_format` and `qemu-img -f` use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// The signed record of a published whole-disk image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskArtifact {
    /// File name below `disks/<id>/` (see [`check_disk_name`]).
    pub file: String,
    /// Container format.
    pub format: DiskFormat,
    /// Size of the file, in bytes (for a raw image: the disk size it needs).
    pub size: u64,
    /// sha256 of the file's bytes.
    pub sha256: Digest,
}

impl DiskArtifact {
    /// The file's path relative to the store root: `disks/<id>/<file>`.
    pub fn store_path(&self, id: &str) -> String {
        format!("{DISKS_DIR}/{id}/{}", self.file)
    }

    /// Check the record on its own: a safe file name, a non-empty file.
    pub fn validate(&self) -> Result<(), String> {
        check_disk_name(&self.file)?;
        if self.size == 0 {
            return Err(format!("disk image {:?} has size 0", self.file));
        }
        Ok(())
    }
}

/// Check a published disk image's file name: something a URL path and
/// `SHA256SUMS` carry unambiguously (letters, digits and `._-+~`, not
/// starting with a dot, not [`SHA256SUMS`]), so it can never name another
/// directory.
pub fn check_disk_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_DISK_NAME
        && name != SHA256SUMS
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "disk image name {name:?} is invalid: use letters, digits and ._-+~ (not starting with a dot)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["disk.qcow2", "overcloud-full.raw", "a_b-1.2+3~x.img"] {
            assert!(check_disk_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_DISK_NAME + 1);
        for bad in [
            "",
            ".hidden.raw",
            "..",
            "SHA256SUMS",
            "a b.raw",
            "a/b.raw",
            "ü.raw",
            long.as_str(),
        ] {
            assert!(check_disk_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn artifact_json_both_ways() {
        let a = DiskArtifact {
            file: "node.raw".into(),
            format: DiskFormat::Raw,
            size: 1 << 30,
            sha256: Digest::of(b"x"),
        };
        let j = serde_json::to_string(&a).unwrap();
        assert!(j.contains("\"format\":\"raw\""), "{j}");
        assert_eq!(serde_json::from_str::<DiskArtifact>(&j).unwrap(), a);
        assert_eq!(a.store_path("v1"), "disks/v1/node.raw");
        assert!(a.validate().is_ok());
        let unknown = j.replace("\"size\"", "\"extra\":1,\"size\"");
        assert!(serde_json::from_str::<DiskArtifact>(&unknown).is_err());
        let vhd = j.replace("\"raw\"", "\"vhd\"");
        assert!(serde_json::from_str::<DiskArtifact>(&vhd).is_err());
        assert!(DiskArtifact {
            size: 0,
            ..a.clone()
        }
        .validate()
        .is_err());
        assert!(DiskArtifact {
            file: "../x.raw".into(),
            ..a
        }
        .validate()
        .is_err());
    }
}
