#!/bin/bash
# Runs every fuzz target for a fixed number of executions and prints one line
# per target: executions, seconds, new corpus entries, crashes. One command,
# outside CI (CI replays the committed corpora through tests/fuzz_corpus.rs).
#
#   fuzz/run-all.sh                 # 10M executions per target, 2 at a time
#   RUNS=1000000 JOBS=1 fuzz/run-all.sh manifest delta
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) on PATH. Stable
# toolchain: libFuzzer without sanitizers (`-s none`), optimised (`-O`).
# New inputs go to $OUT/<target>/ (default /var/tmp/imageupd-fuzz), never into
# the committed corpus; a crashing input is left in $OUT/artifacts/<target>/
# and the script exits 1. The table also goes to $OUT/results.txt.
set -euo pipefail
cd "$(dirname "$0")"
RUNS=${RUNS:-10000000}
JOBS=${JOBS:-2}
OUT=${OUT:-/var/tmp/imageupd-fuzz}
mapfile -t ALL < <(ls fuzz_targets | sed 's/\.rs$//')
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL[@]}")
command -v cargo-fuzz >/dev/null || { echo "run-all: cargo-fuzz not on PATH (cargo install cargo-fuzz --locked)" >&2; exit 2; }
mkdir -p "$OUT"

echo "run-all: building the targets (-s none -O); log $OUT/build.log" >&2
cargo fuzz build -s none -O >"$OUT/build.log" 2>&1 || {
    tail -n 30 "$OUT/build.log" >&2; exit 2; }

run_one() {
    local t=$1 log="$OUT/$1.log" t0 rc=0
    mkdir -p "$OUT/$t" "$OUT/artifacts/$t"
    t0=$(date +%s)
    cargo fuzz run -s none -O "$t" "$OUT/$t" "corpus/$t" -- \
        -runs="$RUNS" -print_final_stats=1 -artifact_prefix="$OUT/artifacts/$t/" \
        >"$log" 2>&1 || rc=$?
    local execs crashes
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
    crashes=$(find "$OUT/artifacts/$t" -type f | wc -l)
    printf '%-16s %12s execs %6d s  corpus %6d  crashes %d  exit %d\n' "$t" "${execs:-?}" \
        $(($(date +%s) - t0)) "$(find "$OUT/$t" -type f | wc -l)" "$crashes" "$rc"
}

: >"$OUT/results.txt"
running=0
for t in "${TARGETS[@]}"; do
    run_one "$t" >>"$OUT/results.txt" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then wait -n || true; running=$((running - 1)); fi
done
wait
sort "$OUT/results.txt" | tee "$OUT/results.sorted.txt"
if grep -qv 'crashes 0  exit 0$' "$OUT/results.txt"; then
    echo "run-all: a target crashed or failed; inputs in $OUT/artifacts/, logs in $OUT/*.log" >&2
    exit 1
fi
