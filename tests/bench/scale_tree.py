#!/usr/bin/env python3
"""Build a synthetic tree of N small entries, the same bytes on every run.

    scale_tree.py DIR N [--hotfix]

Leaf directories hold 100 entries (files of 20-120 bytes, one symlink in
ten), grouped 100 to a parent, so the tree is about three levels deep at a
million entries, like /usr. Every entry has a fixed mtime with a
nanosecond part. With --hotfix, exactly one line of one file changes (its
size and mtime too), as in the compute fixture's one-line hotfix. DIR is
replaced if it exists.
"""
import os
import shutil
import sys

MTIME_NS = 1_700_000_000_123_456_789
PER_DIR = 100


def build(root: str, n: int, hotfix: bool) -> None:
    if os.path.lexists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    made = 0
    leaf = 0
    dirs = []
    while made < n:
        rel = os.path.join(f"g{leaf // (PER_DIR * PER_DIR):03d}", f"d{(leaf // PER_DIR) % PER_DIR:02d}", f"l{leaf % PER_DIR:02d}")
        d = os.path.join(root, rel)
        os.makedirs(d, exist_ok=True)
        dirs.append(d)
        for i in range(PER_DIR):
            if made >= n:
                break
            p = os.path.join(d, f"entry-{i:03d}.py")
            if i % 10 == 9:
                os.symlink(f"entry-{i - 1:03d}.py", p)
                os.utime(p, ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
            else:
                body = f"# {rel}/{i}\n" + "x = 1\n" * (i % 17)
                if hotfix and leaf == 0 and i == 0:
                    body = body.replace("# ", "# hotfix: ", 1)
                with open(p, "w") as f:
                    f.write(body)
                os.utime(p, ns=(MTIME_NS, MTIME_NS + (1 if hotfix and leaf == 0 and i == 0 else 0)))
            made += 1
        leaf += 1
    for d in reversed(dirs):
        os.utime(d, ns=(MTIME_NS, MTIME_NS))
    for top, subdirs, _ in os.walk(root, topdown=False):
        for s in subdirs:
            os.utime(os.path.join(top, s), ns=(MTIME_NS, MTIME_NS), follow_symlinks=False)
    os.utime(root, ns=(MTIME_NS, MTIME_NS))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    build(sys.argv[1], int(sys.argv[2]), "--hotfix" in sys.argv[3:])
