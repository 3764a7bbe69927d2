#!/bin/bash
# Fleet benchmark (issue 11, "Benchmark"). One command, as root:
#
#   tests/bench/fleet-bench.sh [N]          (N simulated nodes, default 50)
#
# N nodes update v1 -> v3 (hotfix) and v1 -> v2 (package update), first
# from one `imageupd serve` through their agents with `[rollout]
# max_unavailable = 5` against one etcd (started here on free 127.0.0.1
# ports, data on /dev/shm), then the same N nodes each pulling with
# `rsync -az` from one rsync daemon on loopback, 5 at a time. Measured in
# the same run: wall time from the metadata change to the last node done,
# server CPU seconds per node update, bytes per node, peak server RSS,
# mean wait for a slot, one node's window and the stage time.
#
# Environment: IMAGEUPD_BIN (default target/release/imageupd, built if
# missing), BENCH_K (5), BENCH_LEVEL (publish zstd level, 19),
# BENCH_DIR (/var/tmp/imageupd-fleet-bench), BENCH_TREES (directory with
# v1 v2 v3; default /var/cache/imageupd-test), BENCH_RESULTS (default
# tests/bench/fleet-results.md), BENCH_HOOK_SLEEP (pre-apply hook sleep,
# 1 s), BENCH_KEEP=1 (keep the scratch). Everything it starts is stopped
# and everything it creates is removed at the end (also on failure/^C).
set -euo pipefail
export LC_ALL=C
REPO=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "fleet-bench.sh must run as root" >&2; exit 1; }
for t in rsync etcd python3 cp; do
    command -v "$t" >/dev/null || { echo "missing $t (tests/setup.sh packages)" >&2; exit 1; }
done
if [ -z "${IMAGEUPD_BIN:-}" ]; then
    IMAGEUPD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd
    if [ ! -x "$IMAGEUPD_BIN" ]; then
        echo "fleet-bench: building imageupd (release)" >&2
        (cd "$REPO" && cargo build --release -q -p imageupd)
    fi
fi
export IMAGEUPD_BIN
if [ -z "${BENCH_TREES:-}" ]; then
    "$REPO/tests/fixtures/build-trees.sh" >&2
fi
exec python3 "$REPO/tests/bench/fleet_bench.py" "$@"
