#!/bin/bash
# Provisioning benchmark (issue 12): the v2 fixture onto an empty disk file,
# four ways, over `imageupd serve` on loopback. One command, as root:
#
#   tests/bench/provision-bench.sh
#   IMAGEUPD_BIN=/work/target-rel/release/imageupd BENCH_RUNS=5 tests/bench/provision-bench.sh
#
# (a) tree:   imageupd provision --from URL --scheme (filesystems made, the
#             signed tree applied through packs);
# (b) stream: imageupd provision --whole-disk --from URL (the published raw
#             disk image streamed, digest checked in-stream, first MiB last);
# (c) ironic: Ironic's path for a qcow2: curl the published qcow2 whole,
#             check it against SHA256SUMS (IPA hashes what it downloads),
#             `qemu-img convert -O raw -t directsync -W` onto the disk (IPA's
#             flags, with raw for host_device on a file: holes stay holes);
# (d) dd:     a local `dd conv=fsync` of the raw image (the floor; no wire).
#
# The raw image is the disk (a) makes, published (`publish DISK.raw`) and
# converted to qcow2 (`qemu-img convert -O qcow2`, uncompressed, as
# diskimage-builder writes it) and published too. Wall time: median of
# BENCH_RUNS (default 3) runs, each onto a new sparse disk file, page cache
# warm. Bytes on the wire: the sum of Content-Length over the responses in
# the server's access log for the run (bodies only, headers excluded), and
# the requests. Results to tests/bench/provision-results.md (BENCH_OUT).
set -euo pipefail
export LC_ALL=C
REPO=$(cd "$(dirname "$0")/../.." && pwd)
[ "$(id -u)" = 0 ] || { echo "provision-bench.sh must run as root" >&2; exit 1; }
for t in qemu-img curl sha256sum python3 dd awk; do
    command -v "$t" >/dev/null || { echo "missing $t (tests/setup.sh packages)" >&2; exit 1; }
done
TREE=${BENCH_TREE:-/var/cache/imageupd-test/v2}
[ -d "$TREE/etc" ] || { echo "no fixture $TREE: run tests/setup.sh fixtures" >&2; exit 1; }
RUNS=${BENCH_RUNS:-3}
DISK_BYTES=${BENCH_DISK_BYTES:-$((1 << 30))}
OUT=${BENCH_OUT:-$REPO/tests/bench/provision-results.md}
if [ -z "${IMAGEUPD_BIN:-}" ]; then
    echo "provision-bench: building imageupd (release)" >&2
    (cd "$REPO" && cargo build --release -q -p imageupd)
    IMAGEUPD_BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd
fi
BIN=$IMAGEUPD_BIN
W=$(mktemp -d "${BENCH_DIR:-/var/tmp}/provision-bench.XXXXXX")
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
say() { echo "provision-bench: $*" >&2; }

# The store: v2 as a tree, the disk (a) makes as raw and as qcow2.
"$BIN" keygen --out "$W/key" >/dev/null
mkdir -p "$W/trusted.d" && cp "$W/key.pub" "$W/trusted.d/"
cat >"$W/scheme.toml" <<'EOF'
firmware = "bios"
seed = "bench-node"
[[disk]]
name = "vda"
[[disk.partition]]
role = "bios-boot"
[[disk.partition]]
role = "root"
min = "512MiB"
EOF
say "publishing $TREE"
"$BIN" publish --store "$W/store" --id v2 --key "$W/key" "$TREE" >/dev/null 2>&1
truncate -s "$DISK_BYTES" "$W/golden.raw"
say "provisioning the golden disk (the raw image)"
"$BIN" provision --from "$W/store" --id v2 --scheme "$W/scheme.toml" \
    --disk "$W/golden.raw" --trusted-keys "$W/trusted.d" >/dev/null 2>&1
qemu-img convert -f raw -O qcow2 "$W/golden.raw" "$W/golden.qcow2"
say "publishing the raw and the qcow2 image"
"$BIN" publish --store "$W/store" --id v2-raw --key "$W/key" "$W/golden.raw" >/dev/null 2>&1
"$BIN" publish --store "$W/store" --id v2-qcow2 --key "$W/key" "$W/golden.qcow2" >/dev/null 2>&1
GOLDEN_SHA=$(sha256sum "$W/golden.raw" | cut -d' ' -f1)

IMAGEUPD_LOG=info "$BIN" serve --store "$W/store" --listen 127.0.0.1:0 >"$W/serve.out" 2>"$W/serve.log" &
SERVER=$!
for _ in $(seq 100); do grep -q '^listening on ' "$W/serve.out" 2>/dev/null && break; sleep 0.1; done
URL=$(awk '/^listening on /{print $3; exit}' "$W/serve.out")
[ -n "$URL" ] || { echo "imageupd serve did not start" >&2; cat "$W/serve.log" >&2; exit 1; }

# One run of method $1 onto a fresh disk file: prints "seconds bytes requests".
run() {
    local m=$1 disk=$W/disk.raw
    rm -f "$disk" "$W/dl.qcow2"
    truncate -s "$DISK_BYTES" "$disk"
    sync
    local log0 t0 t1
    log0=$(wc -l <"$W/serve.log")
    t0=$(date +%s.%N)
    case $m in
    tree)
        "$BIN" provision --json --from "$URL" --id v2 --scheme "$W/scheme.toml" \
            --disk "$disk" --trusted-keys "$W/trusted.d" >"$W/tree.json" 2>"$W/run.err" ;;
    stream)
        "$BIN" provision --json --whole-disk --from "$URL" --id v2-raw \
            --disk "$disk" --trusted-keys "$W/trusted.d" >"$W/stream.json" 2>"$W/run.err" ;;
    ironic)
        curl -fsS -o "$W/dl.qcow2" "${URL}disks/v2-qcow2/golden.qcow2"
        curl -fsS "${URL}disks/v2-qcow2/SHA256SUMS" | (cd "$W" && sed 's/golden.qcow2/dl.qcow2/' | sha256sum -c --quiet -)
        qemu-img convert -f qcow2 -O raw -t directsync -W "$W/dl.qcow2" "$disk"
        sync -f "$disk" ;;
    dd)
        dd if="$W/golden.raw" of="$disk" bs=4M conv=fsync,notrunc status=none ;;
    esac
    t1=$(date +%s.%N)
    # (a) makes the same disk again (same seed, same inputs); the others
    # must reproduce the image exactly.
    if [ "$m" != tree ]; then
        [ "$(sha256sum "$disk" | cut -d' ' -f1)" = "$GOLDEN_SHA" ] ||
            { echo "$m: the disk differs from the image" >&2; exit 1; }
    fi
    sleep 0.2 # the access log line of the last response
    tail -n +"$((log0 + 1))" "$W/serve.log" | python3 -c '
import re, sys
b = r = 0
for l in sys.stdin:
    m = re.search(r"\"(?:GET|HEAD) [^\"]*\" (\d+) (\d+|-)", l)
    if m:
        r += 1
        b += int(m.group(2)) if m.group(2) != "-" else 0
print(b, r)' | { read -r bytes reqs; echo "$(awk "BEGIN {print $t1 - $t0}") $bytes $reqs"; }
}

declare -A TIMES BYTES REQS
for m in tree stream ironic dd; do
    ts=()
    for i in $(seq "$RUNS"); do
        out=$(run "$m")
        read -r t b r <<<"$out"
        say "$m run $i: ${t}s, $b bytes, $r requests"
        ts+=("$t")
        BYTES[$m]=$b REQS[$m]=$r
    done
    TIMES[$m]=$(printf '%s\n' "${ts[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
done

LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
QCOW=$(stat -c %s "$W/golden.qcow2")
USED=$(du -B1 "$W/golden.raw" | cut -f1)
REL=$(python3 -c "print(f'{${BYTES[tree]}/${BYTES[ironic]}:.2f} x bytes, {${TIMES[tree]}/${TIMES[ironic]}:.2f} x time')")
{
    echo "# Provisioning benchmark (issue 12)"
    echo
    echo "\`tests/bench/provision-bench.sh\`, $(date -u +%Y-%m-%d), $(nproc) cores, load average $LOAD at the end;"
    echo "binary $BIN; fixture $TREE ($(du -sh "$TREE" | cut -f1)); disk $((DISK_BYTES >> 20)) MiB"
    echo "(allocated in the raw image: $((USED >> 20)) MiB; the qcow2: $((QCOW >> 20)) MiB). Median of $RUNS runs."
    echo
    echo "| method | wall time (s) | bytes on the wire | requests |"
    echo "|---|---|---|---|"
    for m in tree stream ironic dd; do
        case $m in
        tree) n="(a) imageupd provision --from URL (tree)" ;;
        stream) n="(b) imageupd provision --whole-disk (raw stream)" ;;
        ironic) n="(c) curl qcow2 + sha256sum + qemu-img convert -O raw -t directsync -W" ;;
        dd) n="(d) local dd conv=fsync of the raw image" ;;
        esac
        printf '| %s | %.2f | %s | %s |\n' "$n" "${TIMES[$m]}" "${BYTES[$m]}" "${REQS[$m]}"
    done
    echo
    echo "(a) against (c): $REL (goal: <= 0.5 x bytes, <= 1.0 x time)."
    echo
    echo "Milliseconds per step of the last run (the commands' \`--json\` \`phases\`):"
    echo
    python3 - "$W/tree.json" "$W/stream.json" <<'PY'
import json, sys
for name, path in zip(["(a) tree", "(b) stream"], sys.argv[1:]):
    r = json.load(open(path))
    line = "- " + name + ": " + ", ".join(f"{k} {v}" for k, v in r["phases"].items())
    a = r.get("apply")
    if a:
        line += "; the apply inside: " + ", ".join(f"{k} {v}" for k, v in a["phases"].items())
    print(line)
PY
} | tee "$OUT.new"
mv "$OUT.new" "$OUT"
