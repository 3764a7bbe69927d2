//! Which removals can leave the root as whole trees: a pure function over
//! the planned removals, the preserve list and the mount points.

use super::{Delete, DeleteTree};
use crate::format::manifest::{FileType, RelPath};
use crate::fs::preserve::Preserve;

/// The tops of the removed subtrees that can go in one rename: removed
/// directories (`deletes` in tree order) with no preserved path and no
/// mount point below them, and no such directory above them. Each removal
/// inside one is marked with the tree's index.
pub(super) fn whole_trees(
    deletes: &mut [Delete],
    preserve: &Preserve,
    mounts: &[RelPath],
) -> Vec<DeleteTree> {
    let mut tops: Vec<DeleteTree> = Vec::new();
    for d in deletes.iter_mut() {
        if let Some(t) = tops.last_mut().filter(|t| d.path.starts_with(&t.path)) {
            t.entries += 1;
            d.tree = Some((tops.len() - 1) as u32);
            continue;
        }
        if d.ftype == FileType::Dir
            && !d.path.is_root()
            && !preserve.has_preserved_below(&d.path)
            && !mounts.iter().any(|m| m.starts_with(&d.path))
        {
            d.tree = Some(tops.len() as u32);
            tops.push(DeleteTree {
                path: d.path.clone(),
                entries: 1,
            });
        }
    }
    tops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rp(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    /// Removals in tree order, as the walk finds them.
    fn dels(list: &[(&str, FileType)]) -> Vec<Delete> {
        list.iter()
            .map(|(p, t)| Delete {
                path: rp(p),
                ftype: *t,
                size: 0,
                tree: None,
            })
            .collect()
    }

    #[test]
    fn removed_trees_go_whole_from_their_top() {
        use FileType::{Dir, File};
        let mut d = dels(&[
            ("opt/app", Dir),
            ("opt/app/bin", Dir),
            ("opt/app/bin/x", File),
            ("opt/app/lib", File),
            ("usr/share/doc/old", File),
            ("usr/share/gone", Dir),
            ("usr/share/gone/a", File),
        ]);
        let tops = whole_trees(&mut d, &Preserve::default(), &[]);
        let paths: Vec<_> = tops.iter().map(|t| (t.path.clone(), t.entries)).collect();
        assert_eq!(paths, vec![(rp("opt/app"), 4), (rp("usr/share/gone"), 2)]);
        let marks: Vec<_> = d.iter().map(|d| d.tree).collect();
        assert_eq!(
            marks,
            [Some(0), Some(0), Some(0), Some(0), None, Some(1), Some(1)]
        );
    }

    #[test]
    fn preserved_or_mounted_content_keeps_a_tree_path_by_path() {
        use FileType::{Dir, File};
        let mut d = dels(&[
            ("var", Dir),
            ("var/lib", Dir),
            ("var/lib/old", Dir),
            ("var/lib/old/f", File),
            ("srv", Dir),
            ("srv/data", Dir),
            ("srv/other", Dir),
            ("srv/other/f", File),
        ]);
        let preserve = Preserve::new(&["/var/lib/imageupd/"]).unwrap();
        let tops = whole_trees(&mut d, &preserve, &[rp("srv/data/mnt")]);
        // var and var/lib hold the state directory; srv holds a mount;
        // their removable parts still go whole.
        let paths: Vec<_> = tops.iter().map(|t| t.path.clone()).collect();
        assert_eq!(paths, vec![rp("var/lib/old"), rp("srv/other")]);
        assert_eq!(d[0].tree, None, "var stays");
        assert_eq!(d[5].tree, None, "srv/data holds the mount");
    }
}
