#!/bin/bash
# Memory benchmark (issue 15): peak RSS of publish, a first install, a no-op
# apply and a one-line hotfix on a synthetic tree of BENCH_ENTRIES (default
# 1,000,000) small entries (tests/bench/scale_tree.py), each checked against
# BENCH_BOUND_MB (default 256). One command, as root:
#
#   tests/bench/memory-bench.sh        (builds imageupd --release)
#
# Exits 1 when any step's peak RSS is above the bound: this is the memory
# test of issue 15. It runs here and not in CI (about 5 minutes of tree
# building, publishing and applying on 2 cores). Results to
# tests/bench/memory-results.md. The trees are cached in
# ${IMAGEUPD_TEST_CACHE:-/var/cache/imageupd-test}/scale/.
set -euo pipefail
export LC_ALL=C
REPO=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "memory-bench.sh must run as root" >&2; exit 1; }
N=${BENCH_ENTRIES:-1000000}
BOUND_MB=${BENCH_BOUND_MB:-256}
CACHE=${IMAGEUPD_TEST_CACHE:-/var/cache/imageupd-test}/scale
WORK=${BENCH_DIR:-/var/tmp/imageupd-memory-bench}
RESULTS=${BENCH_RESULTS:-$REPO/tests/bench/memory-results.md}
if [ -z "${IMAGEUPD_BIN:-}" ]; then
    echo "memory-bench: building imageupd (release)" >&2
    (cd "$REPO" && cargo build --release -q -p imageupd)
    IMAGEUPD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd
fi
B=$IMAGEUPD_BIN
log() { echo "memory-bench: $*" >&2; }

# The trees, built once (NAME.tmp renamed into place when complete).
mkdir -p "$CACHE"
for t in "s$N" "s$N-hotfix"; do
    if [ ! -d "$CACHE/$t" ]; then
        log "building $CACHE/$t"
        flag=; [ "$t" = "s$N-hotfix" ] && flag=--hotfix
        python3 "$REPO/tests/bench/scale_tree.py" "$CACHE/$t.tmp" "$N" $flag
        mv "$CACHE/$t.tmp" "$CACHE/$t"
    fi
done

cleanup() {
    mountpoint -q "$WORK/root" && umount "$WORK/root"
    rm -f "$WORK/root.img"
}
trap cleanup EXIT
[ -d "$WORK" ] && { mountpoint -q "$WORK/root" && umount "$WORK/root"; rm -rf "$WORK"; }
mkdir -p "$WORK/root"
"$B" keygen --out "$WORK/key" >/dev/null
# Tiny files take a block each: room for them and an inode per entry.
truncate -s $(( (N / 1000000 + 1) * 10 ))G "$WORK/root.img"
mkfs.ext4 -q -F -N $(( N + N / 4 + 10000 )) "$WORK/root.img"
mount -o loop "$WORK/root.img" "$WORK/root"
mkdir -p "$WORK/root/etc/imageupd/trusted.d"
cp "$WORK/key.pub" "$WORK/root/etc/imageupd/trusted.d/"

rows=()
fail=0
# measure LABEL CMD...: wall time and peak RSS of CMD, checked against the bound.
measure() {
    local label=$1; shift
    /usr/bin/time -f "%e %M" -o "$WORK/time" "$@" > "$WORK/out" 2> "$WORK/err" \
        || { cat "$WORK/err" >&2; log "$label failed"; exit 1; }
    read -r wall kib < "$WORK/time"
    local mb=$(( kib / 1024 )) verdict=ok
    if [ "$mb" -gt "$BOUND_MB" ]; then verdict="**over**"; fail=1; fi
    rows+=("| $label | ${wall} s | $mb MB | $verdict |")
    log "$label: ${wall} s, peak RSS $mb MB ($verdict)"
}
measure "publish ($N entries)" "$B" publish --store "$WORK/store" --id s0 --channel scale \
    --key "$WORK/key" --level 3 "$CACHE/s$N"
"$B" publish --store "$WORK/store" --id s1 --channel scale --key "$WORK/key" --level 3 \
    "$CACHE/s$N-hotfix" > /dev/null 2>&1
measure "first install" "$B" apply --root "$WORK/root" --from "$WORK/store" --id s0
"$B" apply --root "$WORK/root" --from "$WORK/store" --id s0 > /dev/null 2>&1
measure "no-op apply (stamp cache warm)" "$B" apply --root "$WORK/root" --from "$WORK/store" --id s0
measure "one-line hotfix" "$B" apply --root "$WORK/root" --from "$WORK/store" --id s1

{
    echo "# Memory benchmark (\`tests/bench/memory-bench.sh\`)"
    echo
    echo "Generated $(date -u '+%Y-%m-%d %H:%M UTC') on $(nproc) CPUs; synthetic tree of $N entries"
    echo "(tests/bench/scale_tree.py: files of 20-120 bytes, one symlink in ten, 100 per directory);"
    echo "local store, level 3; root on a loop-mounted ext4. Bound: $BOUND_MB MB peak RSS per step."
    echo
    echo "| step | wall | peak RSS | within $BOUND_MB MB |"
    echo "|---|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
} > "$RESULTS"
cat "$RESULTS"
exit $fail
