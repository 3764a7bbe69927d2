#!/bin/bash
# Network benchmark: bytes on the wire and HTTP requests of an update, and
# publisher throughput (issue 5). One command, as root:
#
#   tests/bench/net-bench.sh                 (builds imageupd --release)
#   BENCH_RUNS=7 BENCH_LEVEL=19 tests/bench/net-bench.sh
#
# Compares, for v1 -> v2 (package update) and v1 -> v3 (one binary), and a
# first full install of v1:
#   * imageupd apply from `imageupd serve` on loopback: through the update
#     delta (v2, v3 published with --parent v1), with packs (deltas hidden) and with
#     loose objects only (pack indexes hidden, as an older publisher);
#   * rsync -az --delete from an rsync daemon on loopback (--stats bytes);
#   * OSTree: an archive repo served by nginx, `ostree pull` of objects and
#     of a static delta (bytes and requests from nginx's access log);
#   * the compression floor: changed and added files, each `zstd -19`,
#     against its old version with `--patch-from` where one exists;
#   * `tar --zstd` (zstd -19) of the whole tree, for the full install.
# And publisher throughput: 64 concurrent clients (wrk) fetching the full
# image over loopback from `imageupd serve` and from nginx on the same store;
# errors and peak RSS of `imageupd serve`.
#
# Medians of BENCH_RUNS (>= 5) runs; results to tests/bench/net-results.md.
set -euo pipefail
export LC_ALL=C
REPO=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "net-bench.sh must run as root" >&2; exit 1; }
for t in rsync ostree nginx wrk zstd python3 tar; do
    command -v "$t" >/dev/null || { echo "missing $t (tests/setup.sh packages)" >&2; exit 1; }
done
if [ -z "${IMAGEUPD_BIN:-}" ]; then
    echo "net-bench: building imageupd (release)" >&2
    (cd "$REPO" && cargo build --release -q -p imageupd)
    IMAGEUPD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd
fi
export IMAGEUPD_BIN
"$REPO/tests/fixtures/build-trees.sh" >&2
exec python3 "$REPO/tests/bench/net_bench.py" "$@"
