#!/usr/bin/env python3
"""Driver of tests/bench/compute-delta-bench.sh (see there). Everything runs
on loopback; every server it starts is stopped at the end. Environment:

  IMAGEUPD_BIN        the imageupd binary (release)
  BENCH_RUNS          timed runs per case (default 3)
  BENCH_LEVEL         zstd level of the publish (default 19)
  BENCH_PAIRS         targets measured from c1 (default "c2 c1h")
  BENCH_DIR           scratch (default /var/tmp/imageupd-compute-delta-bench)
  IMAGEUPD_TEST_CACHE fixture trees (default /var/cache/imageupd-test)
"""

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import free_port, run, wait_port

REPO = Path(__file__).resolve().parents[2]
BIN = os.environ["IMAGEUPD_BIN"]
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
LEVEL = os.environ.get("BENCH_LEVEL", "19")
WORK = Path(os.environ.get("BENCH_DIR", "/var/tmp/imageupd-compute-delta-bench"))
CACHE = Path(os.environ.get("IMAGEUPD_TEST_CACHE", "/var/cache/imageupd-test")) / "compute"
RESULTS = REPO / "tests/bench/compute-delta-results.md"
# The pairs: (target, parent). c2 is the security upgrade, c1h the hotfix.
PAIRS = tuple((t, "c1") for t in os.environ.get("BENCH_PAIRS", "c2 c1h").split())
procs = []


def log(*a):
    print("compute-delta-bench:", *a, file=sys.stderr, flush=True)


def start(cmd, port, what, **kw):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, **kw)
    procs.append(p)
    wait_port(port, p, what)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def med(xs):
    return statistics.median(xs)


def publish(store, key):
    reps = {}
    for i, parent in (("c1", None),) + PAIRS:
        if (store / "images" / i / "manifest.json.zst").exists():
            continue
        cmd = [BIN, "publish", "--store", store, "--id", i, "--key", key, "--level", LEVEL,
               "--json"]
        if parent:
            cmd += ["--parent", parent]
        t0 = time.time()
        reps[i] = json.loads(run(cmd + [CACHE / i]))
        log(f"published {i} in {time.time() - t0:.1f} s: {reps[i].get('delta')}")
    return reps


def template(store, key):
    """An imageupd-installed c1 node (state + trusted key)."""
    t = WORK / "template-c1"
    if not (t / "etc/image_id").exists():
        shutil.rmtree(t, ignore_errors=True)
        run(["cp", "-a", CACHE / "c1", t])
        td = t / "etc/imageupd/trusted.d"
        td.mkdir(parents=True, exist_ok=True)
        shutil.copy(f"{key}.pub", td / "bench.pub")
        run([BIN, "apply", "--from", store, "--id", "c1", "--root", t])
    return t


def fresh_root(tmpl):
    r = WORK / "root"
    run(["rsync", "-aHAX", "--delete", "--numeric-ids", f"{tmpl}/", f"{r}/"])
    return r


def apply(src, root, to):
    t0 = time.time()
    j = json.loads(run([BIN, "apply", "--from", src, "--id", to, "--root", root, "--json"]))
    r = {"wall": time.time() - t0, "resolve_ms": j["phases"]["resolve"], "phases": j["phases"]}
    d = j.get("download")
    if d:
        r.update({k: d.get(k) for k in ("bytes", "requests", "objects", "delta",
                                        "delta_objects", "packed_objects", "pack_requests")})
    r["fetch_objects"] = j["plan"]["fetch_objects"]
    return r


def rsync_daemon():
    port = free_port()
    conf = WORK / "rsyncd.conf"
    conf.write_text(f"pid file = {WORK}/rsyncd.pid\nuse chroot = no\n[trees]\npath = {CACHE}\n"
                    "read only = yes\nuid = root\ngid = root\n")
    p = start(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
               "--address=127.0.0.1"], port, "rsync daemon", stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    return p, port


def rsync_bytes(port, to, base):
    dst = WORK / "rsync-dst"
    run(["rsync", "-aHAX", "--delete", "--numeric-ids", f"{CACHE / base}/", f"{dst}/"])
    out = run(["rsync", "-az", "--delete", "--numeric-ids", "--stats",
               f"rsync://127.0.0.1:{port}/trees/{to}/", f"{dst}/"])
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    recv = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
    return sent + recv


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    key = WORK / "bench-key"
    if not key.exists():
        run([BIN, "keygen", "--out", key])
    store = WORK / "store"
    reps = publish(store, key)
    tmpl = template(store, key)
    port = free_port()
    srv = start([BIN, "serve", "--store", store, "--listen", f"127.0.0.1:{port}"], port,
                "imageupd serve", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    rp, rport = rsync_daemon()
    out = {"publish": reps, "pairs": {}}
    try:
        for to, base in PAIRS:
            delta = store / "images" / to / "deltas" / f"{base}.delta"
            row = {"delta_file_bytes": delta.stat().st_size if delta.exists() else None,
                   "rsync_az_bytes": rsync_bytes(rport, to, base), "http": [], "local": []}
            for _ in range(RUNS):
                # Alternate so that both see the same machine state.
                row["http"].append(apply(url, fresh_root(tmpl), to))
                row["local"].append(apply(store, fresh_root(tmpl), to))
            log(f"{to}: {json.dumps(row)}")
            out["pairs"][to] = row
    finally:
        stop(srv)
        stop(rp)
    (WORK / "raw.json").write_text(json.dumps(out, indent=1))
    write_results(out)


def write_results(out):
    L = ["# Compute-node image: update deltas (issue 15)", "",
         f"Fixture trees: tests/fixtures/build-compute-trees.sh ({CACHE}); publish level {LEVEL}; "
         f"medians of {RUNS}; `{BIN}`; same run for every figure.", "",
         "| pair | delta objects taken / fetched | from packs | requests | bytes over HTTP | "
         "rsync -az | ratio | resolve through delta | resolve local | ratio |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for to, row in out["pairs"].items():
        h, loc = row["http"], row["local"]
        b = med([r["bytes"] for r in h])
        rh = med([r["resolve_ms"] for r in h])
        rl = med([r["resolve_ms"] for r in loc])
        L.append(f"| c1 → {to} | {med([r['delta_objects'] for r in h])} / "
                 f"{med([r['fetch_objects'] for r in h])} | {med([r['packed_objects'] for r in h])} | "
                 f"{med([r['requests'] for r in h])} | {b} | {row['rsync_az_bytes']} | "
                 f"{b / row['rsync_az_bytes']:.2f} | {rh} ms | {rl} ms | {rh / max(rl, 1):.2f} |")
    RESULTS.write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in procs:
            stop(p)
