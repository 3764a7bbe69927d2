#!/bin/bash
# Change-tracking benchmark (issue 15). One command, as root:
#
#   tests/bench/track-bench.sh        (builds imageupd --release)
#
# Builds (once, cached) the compute-node trees c1, c1h (one-line hotfix in
# nova's libvirt driver) and c2 (security upgrade) with
# tests/fixtures/build-compute-trees.sh, publishes each pair into a local
# store, and for c1 -> c1h and c1 -> c2 measures in the same run, medians
# of BENCH_RUNS (5):
#   * `imageupd apply` by hand (full walk, stamp cache warm);
#   * the same update through `imageupd agent` with change tracking;
#   * rsync -aHAX --delete --one-file-system of the same transition;
# with peak RSS of each and the apply phases. Results to
# tests/bench/track-results.md. BENCH_TREES=BASE:TARGET:LABEL picks other
# trees (absolute paths), e.g. tests/bench/scale_tree.py output.
set -euo pipefail
export LC_ALL=C
REPO=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "track-bench.sh must run as root" >&2; exit 1; }
for t in rsync python3 mkfs.ext4; do
    command -v "$t" >/dev/null || { echo "missing $t (tests/setup.sh packages)" >&2; exit 1; }
done
if [ -z "${IMAGEUPD_BIN:-}" ]; then
    echo "track-bench: building imageupd (release)" >&2
    (cd "$REPO" && cargo build --release -q -p imageupd)
    IMAGEUPD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd
fi
export IMAGEUPD_BIN
if [ -z "${BENCH_TREES:-}" ]; then
    "$REPO/tests/fixtures/build-compute-trees.sh" >&2
fi
exec python3 "$REPO/tests/bench/track_bench.py" "$@"
