//! One object of a tree as the walk read it from disk.

use crate::format::manifest::{RelPath, Xattrs};
use crate::fs::fsx::Stat;

/// One object found by the walk.
#[derive(Clone, Debug)]
pub struct Node {
    /// Path relative to the walked root.
    pub path: RelPath,
    /// `lstat` of the object.
    pub stat: Stat,
    /// Its xattrs.
    pub xattrs: Xattrs,
    /// Symlink target.
    pub target: Option<Vec<u8>>,
    /// True for a directory on which another filesystem is mounted; its
    /// content is invisible to the walk and its metadata is not ours.
    pub mountpoint: bool,
    /// Xattrs and target came from the stamp cache ([`crate::fs::stamps`]),
    /// not from the inode.
    pub cached: bool,
    /// Content digest the stamp cache vouches for (a regular file whose
    /// inode has not changed since a run that knew its content).
    pub known: Option<crate::format::manifest::Digest>,
}

impl Node {
    /// True for a directory the walk descends into (not a mount point).
    pub fn is_walked_dir(&self) -> bool {
        self.stat.ftype == crate::format::manifest::FileType::Dir && !self.mountpoint
    }
}
