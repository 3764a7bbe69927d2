#!/bin/bash
# The main job, end to end, on data this script makes itself, through the
# embedded publisher:
#
#   1. set-up (tests/setup.sh: packages, the debootstrap fixture trees) and a
#      release build;
#   2. two images: v1 = Debian bookworm minbase + a small web service's page
#      ("version 1"), v2 = v1 + packages, an edited config and the page
#      "version 2"; both published into a signed store (v2 with --parent v1,
#      so an update delta exists) and served by `imageupd serve` on loopback;
#   3. a node root running v1, with the service really running (a tiny HTTP
#      server on loopback serving the root's /srv/www), the ready-made hooks
#      (hooks/) quiescing it through a small systemctl stand-in, and metadata
#      written where os-collect-config keeps its cache;
#   4. the agent (`imageupd agent`) watching that metadata; the demo changes
#      `image_id` to v2 the way os-collect-config does (new file, rename),
#      while a prober asks the service for its page every 20 ms;
#   5. `verify --checksum`, and a summary: bytes fetched, requests, quiesce
#      window, the service's measured downtime, total time.
#
#   sudo tests/demo-serve.sh          (work dir: /var/tmp/imageupd-demo-serve)
#
# Idempotent: each run starts from a fresh work dir; the set-up and the build
# are reused. The last line is `demo: OK …` on success. With
# DEMO_SUMMARY_JSON=FILE the figures are also written as JSON (CI checks them).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${DEMO_DIR:-/var/tmp/imageupd-demo-serve}
CACHE=${IMAGEUPD_TEST_CACHE:-/var/cache/imageupd-test}
T_START=$(date +%s.%N)
[ "$(id -u)" = 0 ] || { echo "demo-serve.sh must run as root (device nodes, files owned by other users)" >&2; exit 1; }

say() { printf '\n== %s\n' "$*"; }
die() { echo "demo: FAILED: $*" >&2; exit 1; }

PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    [ -f "$WORK/web.pid" ] && kill "$(cat "$WORK/web.pid")" 2>/dev/null || true
}
trap cleanup EXIT

say "set-up: packages and fixture trees (tests/setup.sh; nothing is installed twice)"
"$REPO/tests/setup.sh"

say "building imageupd (release)"
(cd "$REPO" && cargo build --release -q -p imageupd)
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd

rm -rf "$WORK"
mkdir -p "$WORK"

say "making the images: v1 and v2 (Debian bookworm roots + the service's page)"
cp -a "$CACHE/v1" "$WORK/img-v1"
cp -a "$CACHE/v2" "$WORK/img-v2"
for v in 1 2; do
    mkdir -p "$WORK/img-v$v/srv/www"
    printf '<h1>demo service: version %s</h1>\n' "$v" >"$WORK/img-v$v/srv/www/index.html"
done

say "publish v1 and v2 (signed; v2 with --parent v1)"
"$BIN" keygen --out "$WORK/signing.key"
"$BIN" publish --store "$WORK/store" --id v1 --key "$WORK/signing.key" "$WORK/img-v1" | tail -1
"$BIN" publish --store "$WORK/store" --id v2 --parent v1 --key "$WORK/signing.key" "$WORK/img-v2" | tail -1

say "imageupd serve on loopback"
"$BIN" serve --store "$WORK/store" --listen 127.0.0.1:0 >"$WORK/serve.out" 2>"$WORK/serve.log" &
PIDS+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$WORK/serve.out" "$WORK/serve.log" 2>/dev/null && break; sleep 0.1; done
URL=$(grep -ho 'http://127.0.0.1:[0-9]*' "$WORK/serve.out" "$WORK/serve.log" | head -1)
[ -n "$URL" ] || die "imageupd serve did not say where it listens: $(cat "$WORK/serve.log")"
echo "store served at $URL"

say "a node running v1: root, trusted key, ready-made hooks, the service"
ROOT=$WORK/root
cp -a "$WORK/img-v1" "$ROOT"
mkdir -p "$ROOT/etc/imageupd/trusted.d" "$ROOT/etc/imageupd/config.d" "$ROOT/etc/imageupd/hooks"
cp "$WORK/signing.key.pub" "$ROOT/etc/imageupd/trusted.d/demo.pub"
for phase in pre-apply post-apply abort; do
    mkdir -p "$ROOT/etc/imageupd/hooks/$phase.d"
    cp "$REPO/hooks/$phase.d/"* "$ROOT/etc/imageupd/hooks/$phase.d/"
done
echo "demo-web.service" >"$ROOT/etc/imageupd/quiesce-units"
OCC=$WORK/os-collect-config # where os-collect-config keeps its cache
mkdir -p "$OCC"
cat >"$ROOT/etc/imageupd/config.d/50-demo.toml" <<EOF
[agent]
metadata_dir = "$OCC"
default_source = "$URL"
debounce_ms = 200
EOF
"$BIN" apply --from "$URL" --id v1 --root "$ROOT" | tail -2

# The service: a tiny HTTP server serving the root's /srv/www, started and
# stopped by a systemctl stand-in (the ready hooks call $SYSTEMCTL on a
# scratch root; on a node they call systemctl itself).
WEB_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$WORK/systemctl" <<EOF
#!/bin/bash
# systemctl stand-in for demo-web.service: start | stop | is-active [--quiet]
pidf=$WORK/web.pid
# A killed server stays a zombie until its new parent reaps it: not running.
running() { [ -f "\$pidf" ] && st=\$(awk '{ print \$3 }' "/proc/\$(cat "\$pidf")/stat" 2>/dev/null) && [ "\$st" != Z ]; }
case \$1 in
  is-active) running ;;
  start) running || { setsid python3 -m http.server --bind 127.0.0.1 --directory "$ROOT/srv/www" $WEB_PORT >>"$WORK/web.log" 2>&1 & echo \$! >"\$pidf"; }
         for _ in \$(seq 500); do (exec 3<>/dev/tcp/127.0.0.1/$WEB_PORT) 2>/dev/null && exit 0; sleep 0.01; done; exit 1 ;;
  stop) if running; then kill "\$(cat "\$pidf")"; while running; do sleep 0.01; done; fi; rm -f "\$pidf" ;;
  *) echo "systemctl stand-in: unknown \$*" >&2; exit 1 ;;
esac
EOF
chmod +x "$WORK/systemctl"
export SYSTEMCTL=$WORK/systemctl
"$SYSTEMCTL" start demo-web.service
curl -fsS "http://127.0.0.1:$WEB_PORT/" | grep -q 'version 1' || die "the service does not serve v1's page"
echo "service up on 127.0.0.1:$WEB_PORT: $(curl -fsS "http://127.0.0.1:$WEB_PORT/")"

# Metadata as os-collect-config writes it: the collected JSON in its cache
# directory (a new file renamed into place) and os_config_files.json listing it.
write_metadata() {
    printf '{"image_id": "%s", "image_source": "%s"}\n' "$1" "$URL" >"$OCC/heat_local.json.new"
    mv "$OCC/heat_local.json.new" "$OCC/heat_local.json"
    printf '["%s"]\n' "$OCC/heat_local.json" >"$OCC/os_config_files.json"
}
write_metadata v1

say "the agent, watching $OCC"
IMAGEUPD_LOG=info "$BIN" agent --root "$ROOT" >"$WORK/agent.log" 2>&1 &
AGENT=$!
PIDS+=($AGENT)
for _ in $(seq 100); do
    "$BIN" status --root "$ROOT" --json 2>/dev/null | grep -q '"state": "watching"' && break
    sleep 0.1
done
"$BIN" status --root "$ROOT" | sed -n 1,3p

# The prober: one request every 20 ms; records each failed sample.
cat >"$WORK/prober.py" <<'EOF'
import json, os, sys, time, urllib.request
url, stop, out = sys.argv[1], sys.argv[2], sys.argv[3]
samples = fails = 0
down_since = None
longest = total_down = 0.0
pages = set()
while not os.path.exists(stop):
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            pages.add(r.read().decode().strip())
        if down_since is not None:
            longest = max(longest, t - down_since)
            total_down += t - down_since
            down_since = None
    except Exception:
        fails += 1
        if down_since is None:
            down_since = t
    samples += 1
    time.sleep(max(0.0, 0.02 - (time.monotonic() - t)))
if down_since is not None:
    longest = max(longest, time.monotonic() - down_since)
    total_down += time.monotonic() - down_since
json.dump({"samples": samples, "failed_samples": fails,
           "longest_outage_ms": round(longest * 1000),
           "total_outage_ms": round(total_down * 1000),
           "pages": sorted(pages)}, open(out, "w"))
EOF
python3 "$WORK/prober.py" "http://127.0.0.1:$WEB_PORT/" "$WORK/prober.stop" "$WORK/prober.json" &
PROBER=$!
sleep 0.5

say "Heat changes image_id to v2 (os-collect-config rewrites its cache)"
T_META=$(date +%s.%N)
write_metadata v2
for _ in $(seq 600); do
    [ "$(cat "$ROOT/etc/image_id" 2>/dev/null)" = v2 ] && "$BIN" status --root "$ROOT" --json | grep -q '"phase": "idle"' && break
    kill -0 "$AGENT" 2>/dev/null || { cat "$WORK/agent.log"; die "the agent exited"; }
    sleep 0.1
done
[ "$(cat "$ROOT/etc/image_id")" = v2 ] || { tail -30 "$WORK/agent.log"; die "the node did not reach v2 within 60 s"; }
T_DONE=$(date +%s.%N)
sleep 0.3
touch "$WORK/prober.stop"
wait "$PROBER"
grep -E 'apply|quiesce|hook' "$WORK/agent.log" | tail -6 || true

say "the service after the update"
PAGE=$(curl -fsS "http://127.0.0.1:$WEB_PORT/")
echo "$PAGE"
echo "$PAGE" | grep -q 'version 2' || die "the service does not serve v2's page"

say "verify --checksum (independent of the apply's bookkeeping)"
"$BIN" verify --root "$ROOT" --checksum

say "status"
"$BIN" status --root "$ROOT"

kill "$AGENT"
wait "$AGENT" || true

# The summary, from the agent's record of the update and the prober.
"$BIN" status --root "$ROOT" --json >"$WORK/status.json"
python3 - "$WORK/status.json" "$WORK/prober.json" "$T_START" "$T_META" "$T_DONE" "${DEMO_SUMMARY_JSON:-}" <<'EOF'
import json, sys
st, pr = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
t_start, t_meta, t_done = map(float, sys.argv[3:6])
la = (st.get("agent") or {}).get("last_applied") or {}
dl = la.get("download") or {}
s = {
    "image": la.get("id"), "from": la.get("from"),
    "bytes_fetched": dl.get("bytes", 0), "requests": dl.get("requests", 0),
    "objects": dl.get("objects", 0), "delta": dl.get("delta"),
    "quiesce_ms": la.get("quiesce_ms"),
    "metadata_to_commit_ms": la.get("metadata_to_commit_ms"),
    "apply_ms": la.get("apply_ms"),
    "downtime_ms": pr["longest_outage_ms"], "failed_probes": pr["failed_samples"],
    "probes": pr["samples"],
    "metadata_to_done_ms": round((t_done - t_meta) * 1000),
    "total_s": round(t_done - t_start, 1),
}
print()
print("== summary")
print(f"  update          {s['from']} -> {s['image']} by the agent, from imageupd serve"
      + (f" (update delta from {s['delta']})" if s['delta'] else ""))
print(f"  fetched         {s['bytes_fetched']/1024:.1f} KiB in {s['requests']} HTTP requests ({s['objects']} objects)")
print(f"  quiesce window  {s['quiesce_ms']} ms (pre-apply hooks start to post-apply hooks start)")
print(f"  service down    {s['downtime_ms']} ms measured by the prober "
      f"({s['failed_probes']} of {s['probes']} probes at 20 ms failed)")
print(f"  metadata write  -> commit {s['metadata_to_commit_ms']} ms, -> done {s['metadata_to_done_ms']} ms (apply {s['apply_ms']} ms)")
print(f"  total           {s['total_s']} s for this demo, set-up and build included")
if sys.argv[6]:
    json.dump(s, open(sys.argv[6], "w"), indent=1)
ok = s["image"] == "v2" and s["bytes_fetched"] > 0 and s["requests"] > 0 and s["quiesce_ms"] is not None
print(f"demo: {'OK' if ok else 'FAILED'}: v1 -> v2 in place through imageupd serve; "
      f"{s['bytes_fetched']} bytes in {s['requests']} requests, service down {s['downtime_ms']} ms")
sys.exit(0 if ok else 1)
EOF
