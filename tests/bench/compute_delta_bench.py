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


def template(store, key, name="template-c1"):
    """An imageupd-installed c1 node (state + trusted key) of `store`'s c1."""
    t = WORK / name
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


def no_parent_stores(key):
    """c1, then c2 published without --parent (a CI job publishing builds as
    they come): the store as published (the automatic delta from the newest
    image, c1), the same store with its deltas removed (packs and loose
    objects only: a node whose image has no delta), and c2 alone in a store
    of its own (packed without any image to reuse: a node far behind)."""
    np = WORK / "store-np"
    if not (np / "images/c2/manifest.json.zst").exists():
        shutil.rmtree(np, ignore_errors=True)
        for i in ("c1", "c2"):
            run([BIN, "publish", "--store", np, "--id", i, "--key", key, "--level", LEVEL,
                 "--json", CACHE / i])
    nodelta = WORK / "store-np-nodelta"
    shutil.rmtree(nodelta, ignore_errors=True)
    run(["cp", "-al", np, nodelta])
    shutil.rmtree(nodelta / "images/c2/deltas", ignore_errors=True)
    alone = WORK / "store-c2-alone"
    if not (alone / "images/c2/manifest.json.zst").exists():
        shutil.rmtree(alone, ignore_errors=True)
        run([BIN, "publish", "--store", alone, "--id", "c2", "--key", key, "--level", LEVEL,
             "--json", CACHE / "c2"])
    return {"auto delta": np, "packs, no delta": nodelta, "packs, c2 alone": alone}


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
        # A node on c1, c2 published without --parent (see no_parent_stores).
        out["no_parent"] = {"rsync_az_bytes": rsync_bytes(rport, "c2", "c1"), "cases": {}}
        stores = no_parent_stores(key)
        # Installed from that store's own c1 (its manifest is the delta's from).
        tmpl_np = template(stores["auto delta"], key, "template-c1-np")
        for name, st in stores.items():
            p = free_port()
            s = start([BIN, "serve", "--store", st, "--listen", f"127.0.0.1:{p}"], p,
                      f"imageupd serve ({name})", stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL)
            try:
                rows = [apply(f"http://127.0.0.1:{p}/", fresh_root(tmpl_np), "c2")
                        for _ in range(RUNS)]
            finally:
                stop(s)
            log(f"no parent, {name}: {json.dumps(rows[0])}")
            out["no_parent"]["cases"][name] = rows
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
    np = out.get("no_parent")
    if np:
        rz = np["rsync_az_bytes"]
        L += ["", "c1 → c2 with c2 published **without** `--parent` (rsync -az "
              f"{rz} bytes in the same run):", "",
              "| store | delta objects | from packs | requests | bytes over HTTP | ratio to rsync -az |",
              "|---|---:|---:|---:|---:|---:|"]
        for name, rows in np["cases"].items():
            b = med([r["bytes"] for r in rows])
            L.append(f"| {name} | {med([r['delta_objects'] for r in rows])} | "
                     f"{med([r['packed_objects'] for r in rows])} | {med([r['requests'] for r in rows])} | "
                     f"{b} | {b / rz:.2f} |")
    RESULTS.write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in procs:
            stop(p)
