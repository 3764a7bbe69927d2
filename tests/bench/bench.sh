#!/bin/bash
# imageupd apply vs rsync -aHAX --delete --one-file-system, on the real
# fixture trees (tests/fixtures/build-trees.sh):
#
#   no-op            v1 -> v1
#   hotfix           v1 -> v3   (one binary changed)
#   package update   v1 -> v2   (less, vim-tiny, iproute2 + deps, a config edit)
#
# For every case and tool: one untimed warm-up run (page cache warm for both),
# then BENCH_RUNS (default 5) timed runs. Before each run, outside the timing,
# the target is reset to the from-tree with rsync:
#   * rsync: target = copy of the from-tree; timed: rsync -aHAX --delete
#     --one-file-system TO/ target/
#   * imageupd: root = copy of the from-tree installed by imageupd (trusted key
#     + state from an adopting apply), then an untimed no-op apply of the
#     from-image, so that the node's state directory (its record and stamp
#     cache) is as its previous apply would have left it on a real node;
#     timed: imageupd apply --from STORE --id TO --root root --json, STORE
#     published beforehand (signed).
# Reported: median wall time of each, the ratio, imageupd's peak RSS
# (/usr/bin/time -f %M, max over runs), the quiesce window (median of
# "quiesce_ms" from apply --json) and quiesce / rsync wall time.
# Writes the table to stdout and tests/bench/results.md.
#
#   tests/bench/bench.sh            (root; builds imageupd --release)
#   BENCH_RUNS=9 BENCH_DIR=/var/tmp/x tests/bench/bench.sh
set -euo pipefail
shopt -s inherit_errexit
export LC_ALL=C

REPO=$(cd "$(dirname "$0")/../.." && pwd)
RUNS=${BENCH_RUNS:-5}
WORK=${BENCH_DIR:-/var/tmp/imageupd-bench}
LEVEL=${BENCH_LEVEL:-9}
CACHE=${IMAGEUPD_TEST_CACHE:-/var/cache/imageupd-test}
RESULTS=$REPO/tests/bench/results.md

[ "$(id -u)" = 0 ] || { echo "bench.sh must run as root" >&2; exit 1; }
[ "$RUNS" -ge 5 ] || { echo "BENCH_RUNS must be >= 5" >&2; exit 1; }
for t in rsync /usr/bin/time awk; do
    command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done

log() { echo "bench: $*" >&2; }
now_ns() { date +%s%N; }

log "building imageupd (release)"
(cd "$REPO" && cargo build --release -q -p imageupd)
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd
[ -x "$BIN" ] || { echo "no release binary at $BIN" >&2; exit 1; }

log "fixture trees"
"$REPO/tests/fixtures/build-trees.sh"

rm -rf "$WORK"
mkdir -p "$WORK"
STORE=$WORK/store
"$BIN" keygen --out "$WORK/key" >/dev/null
for id in v1 v2 v3; do
    t=$(now_ns)
    "$BIN" publish --store "$STORE" --id "$id" --key "$WORK/key" --level "$LEVEL" "$CACHE/$id" >/dev/null
    log "published $id in $(( ($(now_ns) - t) / 1000000 )) ms"
done

# Template of an imageupd-installed v1 node.
TEMPLATE=$WORK/node-v1
cp -a "$CACHE/v1" "$TEMPLATE"
mkdir -p "$TEMPLATE/etc/imageupd/trusted.d"
cp "$WORK/key.pub" "$TEMPLATE/etc/imageupd/trusted.d/bench.pub"
"$BIN" apply --from "$STORE" --id v1 --root "$TEMPLATE" >/dev/null
# rsync sets a directory mtime only when it differs in whole seconds; let
# the template age past the current second before copying it.
sleep 1.1
[ "$(cat "$TEMPLATE/etc/image_id")" = v1 ] || { echo "adopting v1 did not write etc/image_id" >&2; exit 1; }
# The node's root, made once: a real node's files are older than the stamp
# cache's racy window (2 s), a copy made a moment ago is not.
rsync -aHAX --delete --numeric-ids "$TEMPLATE/" "$WORK/imageupd-root/"
sleep 2.1

PRESERVE=(--exclude=/etc/image_id --exclude=/etc/machine-id --exclude=/etc/hostname --exclude=/etc/hosts
    --exclude=/etc/fstab --exclude='/etc/ssh/ssh_host_*' --exclude=/etc/imageupd/ --exclude=/var/lib/imageupd/
    --exclude=/var/lib/os-collect-config/ --exclude=/var/log/ --exclude=/home/ --exclude=/root/ --exclude=/tmp/
    --exclude=/var/tmp/ --exclude=/mnt/state/ --exclude=/lost+found --exclude=/run/imageupd/)

reset() { rsync -aHAX --delete --numeric-ids "$1/" "$2/"; }

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# run_rsync FROM TO -> prints wall ms
run_rsync() {
    local from=$1 to=$2 target=$WORK/rsync-target
    reset "$CACHE/$from" "$target"
    sync
    local t=$(now_ns)
    rsync -aHAX --delete --one-file-system "$CACHE/$to/" "$target/"
    echo $(( ($(now_ns) - t) / 1000000 ))
}

# run_imageupd FROM TO -> prints "wall_ms rss_kb quiesce_ms"
run_imageupd() {
    local from=$1 to=$2 root=$WORK/imageupd-root
    reset "$TEMPLATE" "$root"
    "$BIN" apply --from "$STORE" --id "$from" --root "$root" >/dev/null
    sync
    local t=$(now_ns)
    /usr/bin/time -f %M -o "$WORK/time.out" "$BIN" apply --from "$STORE" --id "$to" --root "$root" --json >"$WORK/apply.json"
    local wall=$(( ($(now_ns) - t) / 1000000 ))
    local rss q
    rss=$(tail -n 1 "$WORK/time.out")
    q=$(grep -o '"quiesce_ms"[[:space:]]*:[[:space:]]*[0-9.a-z]*' "$WORK/apply.json" | head -n 1 | sed 's/.*://; s/[[:space:]]//g')
    [ -n "$q" ] || { echo "apply --json has no quiesce_ms: $(cat "$WORK/apply.json")" >&2; exit 1; }
    # A no-op apply quiesces nothing and may report null.
    [ "$q" != null ] || q=0
    echo "$wall $rss $q"
}

check_result() {
    local to=$1 dir=$2 what=$3 out
    out=$(rsync -naHAX --delete --checksum --numeric-ids --itemize-changes "${PRESERVE[@]}" "$CACHE/$to/" "$dir/")
    if [ -n "$out" ]; then
        echo "bench: $what does not match $to after the run:" >&2
        echo "$out" | head -n 20 >&2
        exit 1
    fi
}

declare -a ROWS=()
for spec in "no-op:v1:v1" "hotfix:v1:v3" "package update:v1:v2"; do
    IFS=: read -r name from to <<<"$spec"
    log "$name ($from -> $to): warm-up"
    run_rsync "$from" "$to" >/dev/null
    run_imageupd "$from" "$to" >/dev/null
    r_ms=() i_ms=() i_rss=() i_q=()
    for n in $(seq 1 "$RUNS"); do
        r=$(run_rsync "$from" "$to")
        out=$(run_imageupd "$from" "$to")
        read -r w rss q <<<"$out"
        r_ms+=("$r") i_ms+=("$w") i_rss+=("$rss") i_q+=("$q")
        log "$name run $n: rsync ${r} ms, imageupd ${w} ms (rss ${rss} KiB, quiesce ${q} ms)"
    done
    check_result "$to" "$WORK/rsync-target" "rsync target"
    check_result "$to" "$WORK/imageupd-root" "imageupd root"
    rm_med=$(printf '%s\n' "${r_ms[@]}" | median)
    im_med=$(printf '%s\n' "${i_ms[@]}" | median)
    q_med=$(printf '%s\n' "${i_q[@]}" | median)
    rss_max=$(printf '%s\n' "${i_rss[@]}" | sort -n | tail -n 1)
    ROWS+=("$(awk -v n="$name" -v r="$rm_med" -v i="$im_med" -v m="$rss_max" -v q="$q_med" 'BEGIN {
        printf "| %s | %.0f | %.0f | %.2f | %.1f | %.0f | %.3f |", n, r, i, (r > 0 ? i / r : 0), m / 1024, q, (r > 0 ? q / r : 0) }')")
done

{
    echo "# imageupd apply vs rsync"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, kernel $(uname -r), $(df -T "$WORK" | awk 'NR == 2 { print $2 }') on $(df "$WORK" | awk 'NR == 2 { print $1 }'),"
    echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine inflates every number)."
    echo "$RUNS timed runs per cell after one warm-up run (page cache warm), medians; store published with --level $LEVEL."
    echo "rsync: \`rsync -aHAX --delete --one-file-system IMAGE/ TARGET/\`; imageupd: \`imageupd apply --from STORE --id ID --root ROOT --json\` (release build) on an imageupd-installed copy of the from-tree whose state directory is as a previous apply left it (an untimed no-op apply refreshes its stamp cache after each reset)."
    echo "ratio = imageupd / rsync wall time; quiesce = \"quiesce_ms\" of apply --json (hooks-to-resume window)."
    echo
    echo "| case | rsync median ms | imageupd median ms | ratio | imageupd peak RSS MB | quiesce ms | quiesce/rsync |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$RESULTS"
log "written to $RESULTS"
