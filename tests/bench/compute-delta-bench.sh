#!/bin/bash
# Compute-node benchmark of update deltas (issue 15). One command, as root:
#
#   tests/bench/compute-delta-bench.sh        (builds imageupd --release)
#
# Builds (once, cached) the compute-node trees c1, c1h (one-line hotfix in
# nova's libvirt driver) and c2 (security upgrade) with
# tests/fixtures/build-compute-trees.sh, publishes them (c1h and c2 with
# --parent c1), and for c1 -> c2 and c1 -> c1h measures in the same run:
#   * over `imageupd serve` on loopback: objects taken from the delta
#     against the objects fetched, objects from packs, requests, bytes;
#   * rsync -az --delete from an rsync daemon on loopback (--stats bytes);
#   * the resolve phase (`apply --json`) through the delta against the same
#     apply from the store directory (local manifest load);
#   * c1 -> c2 with c2 published without --parent: through the automatic
#     delta from the store's newest image, through packs and loose objects
#     only (deltas removed), and from a store holding c2 alone.
# Results to tests/bench/compute-delta-results.md.
set -euo pipefail
export LC_ALL=C
REPO=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "compute-delta-bench.sh must run as root" >&2; exit 1; }
for t in rsync python3; do
    command -v "$t" >/dev/null || { echo "missing $t (tests/setup.sh packages)" >&2; exit 1; }
done
if [ -z "${IMAGEUPD_BIN:-}" ]; then
    echo "compute-delta-bench: building imageupd (release)" >&2
    (cd "$REPO" && cargo build --release -q -p imageupd)
    IMAGEUPD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd
fi
export IMAGEUPD_BIN
"$REPO/tests/fixtures/build-compute-trees.sh" >&2
exec python3 "$REPO/tests/bench/compute_delta_bench.py" "$@"
