#!/usr/bin/env python3
"""Driver of tests/bench/track-bench.sh (see there): the cost of a small
update on a compute-node-sized root, by hand (full walk, stamp cache warm)
and through the agent with change tracking, against rsync on the same
transition in the same run. Environment:

  IMAGEUPD_BIN        the imageupd binary (release)
  BENCH_RUNS          timed runs per case (default 5)
  BENCH_DIR           scratch (default /var/tmp/imageupd-track-bench)
  BENCH_TREES         "BASE:TARGET:LABEL ..." (default the compute fixture:
                      c1:c1h:hotfix c1:c2:security-upgrade)
  IMAGEUPD_TEST_CACHE fixture trees (default /var/cache/imageupd-test)
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import run

REPO = Path(__file__).resolve().parents[2]
BIN = os.environ["IMAGEUPD_BIN"]
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
WORK = Path(os.environ.get("BENCH_DIR", "/var/tmp/imageupd-track-bench"))
CACHE = Path(os.environ.get("IMAGEUPD_TEST_CACHE", "/var/cache/imageupd-test")) / "compute"
RESULTS = Path(os.environ.get("BENCH_RESULTS", REPO / "tests/bench/track-results.md"))
CASES = [
    tuple(c.split(":"))
    for c in os.environ.get("BENCH_TREES", "c1:c1h:hotfix c1:c2:security-upgrade").split()
]
RSYNC = ["rsync", "-aHAX", "--delete", "--one-file-system"]


def log(*a):
    print("track-bench:", *a, file=sys.stderr, flush=True)


def tree(name):
    p = Path(name)
    return p if p.is_absolute() else CACHE / name


class LoopFs:
    """An ext4 loop filesystem of SIZE, mounted at DIR (ours to remove)."""

    def __init__(self, d: Path, size: str):
        self.img = d.with_suffix(".img")
        self.mnt = d
        run(["truncate", "-s", size, str(self.img)])
        run(["mkfs.ext4", "-q", "-F", str(self.img)])
        d.mkdir(parents=True, exist_ok=True)
        run(["mount", "-o", "loop", str(self.img), str(d)])

    def close(self):
        subprocess.run(["umount", str(self.mnt)], check=False)
        self.img.unlink(missing_ok=True)


def timed(cmd, **kw):
    """Wall seconds and peak RSS (KiB) of CMD."""
    t = time.monotonic()
    out = run(["/usr/bin/time", "-f", "%M", "-o", str(WORK / "rss")] + cmd, **kw)
    wall = time.monotonic() - t
    return wall, int((WORK / "rss").read_text().split()[-1]), out


def apply(root, store, image, json_out=False, downgrade=True):
    cmd = [BIN, "apply", "--root", str(root), "--from", str(store), "--id", image]
    if downgrade:
        cmd.append("--allow-downgrade")
    if json_out:
        cmd.append("--json")
    return timed(cmd)


def agent_status(root):
    r = subprocess.run([BIN, "status", "--root", str(root), "--json"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout)["agent"]


def agent_flip(root, meta, store, image):
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({"image_id": image, "image_source": str(store)}))
    tmp.rename(meta)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        a = agent_status(root)
        la = a.get("last_applied") or {}
        if la.get("id") == image and a.get("state") != "applying":
            return la
        if a.get("last_error") and a.get("wanted") == image and a.get("state") == "backing-off":
            raise SystemExit(f"agent failed to apply {image}: {a['last_error']}")
        time.sleep(0.05)
    raise SystemExit(f"agent did not apply {image}")


def vm_hwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def med(xs):
    return statistics.median(xs)


def bench_case(base, target, label, store, key):
    """Hand-run, agent and rsync figures for BASE -> TARGET."""
    ids_a = [f"{label}-a{i}" for i in range(RUNS + 1)]
    ids_b = [f"{label}-b{i}" for i in range(RUNS + 1)]
    for a, b in zip(ids_a, ids_b):
        for i, t in ((a, base), (b, target)):
            run([BIN, "publish", "--store", str(store), "--id", i, "--channel", label, "--key", str(key), "--level", "3", str(tree(t))])
    fs = LoopFs(WORK / f"root-{label}", "6G")
    rs = LoopFs(WORK / f"rsync-{label}", "6G")
    try:
        root = fs.mnt
        (root / "etc/imageupd/trusted.d").mkdir(parents=True)
        shutil.copy(str(key) + ".pub", root / "etc/imageupd/trusted.d/bench.pub")
        meta = WORK / f"meta-{label}.json"
        (root / "etc/imageupd/config.toml").write_text(
            f'[agent]\nmetadata_file = "{meta}"\ndebounce_ms = 10\nrescan_secs = 3600\n')
        log(f"{label}: first install of {base}")
        apply(root, store, ids_a[0], downgrade=False)
        # Nothing of the publish or the install left to write back: syncfs
        # in an apply would wait for it.
        os.sync()
        # Hand-run: the stamp cache warms on the first pair.
        hand, hand_rss, phases = [], [], []
        for i in range(RUNS + 1):
            apply(root, store, ids_a[0])
            wall, rss, out = apply(root, store, ids_b[0], json_out=True)
            if i:
                hand.append(wall)
                hand_rss.append(rss)
                phases.append(json.loads(out)["phases"])
        apply(root, store, ids_a[0])
        # The agent: its first walk is full; each later one tracked.
        agent = subprocess.Popen([BIN, "agent", "--root", str(root)], stdin=subprocess.DEVNULL,
                                 stdout=open(WORK / f"agent-{label}.log", "w"), stderr=subprocess.STDOUT,
                                 env=dict(os.environ, IMAGEUPD_LOG="info"))
        tracked, modes, tphases = [], [], []
        try:
            time.sleep(0.5)
            agent_flip(root, meta, store, ids_b[0])
            for i in range(1, RUNS + 1):
                agent_flip(root, meta, store, ids_a[i])
                la = agent_flip(root, meta, store, ids_b[i])
                tracked.append(la["apply_ms"] / 1000)
                modes.append((la.get("walk") or {}).get("mode"))
                tphases.append(la["phases_ms"])
            agent_rss = vm_hwm_kib(agent.pid)
        finally:
            agent.terminate()
            agent.wait(60)
        # rsync of the same transition, onto the same kind of filesystem.
        run(RSYNC + [f"{tree(base)}/", f"{rs.mnt}/"])
        os.sync()
        rsync, rsync_rss = [], []
        for i in range(RUNS + 1):
            run(RSYNC + [f"{tree(base)}/", f"{rs.mnt}/"])
            wall, rss, _ = timed(RSYNC + [f"{tree(target)}/", f"{rs.mnt}/"])
            if i:
                rsync.append(wall)
                rsync_rss.append(rss)
        objects = json.loads(apply(root, store, ids_a[0], json_out=True)[2])["walk"]["objects"]
    finally:
        fs.close()
        rs.close()
    phase_med = {k: med([p.get(k, 0) for p in phases]) for k in ("resolve", "plan", "stage", "sync", "swap")}
    tphase_med = {k: med([p.get(k, 0) for p in tphases]) for k in ("resolve", "plan", "stage", "sync", "swap")}
    return {
        "label": label, "base": base, "target": target, "objects": objects,
        "hand_s": med(hand), "hand_rss_kib": max(hand_rss), "hand_phases_ms": phase_med,
        "agent_s": med(tracked), "agent_modes": modes, "agent_rss_kib": agent_rss, "agent_phases_ms": tphase_med,
        "rsync_s": med(rsync), "rsync_rss_kib": max(rsync_rss),
    }


def write_results(rows):
    lines = [
        "# Change tracking benchmark (`tests/bench/track-bench.sh`)",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPUs; "
        f"medians of {RUNS}; local store; both roots loop-mounted ext4. \"by hand\" is `imageupd apply` "
        "(full walk, stamp cache warm); \"agent\" is the update through `imageupd agent` with change "
        "tracking (its `apply_ms`); rsync is `rsync -aHAX --delete --one-file-system` of the same "
        "transition. Peak RSS: the apply process by hand, the agent process over all its updates.",
        "",
        "| case | objects | by hand | agent (tracked) | rsync | hand / rsync | agent / rsync | peak RSS hand / agent / rsync |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} ({r['base']} → {r['target']}) | {r['objects']} | {r['hand_s']:.3f} s | {r['agent_s']:.3f} s | "
            f"{r['rsync_s']:.3f} s | {r['hand_s'] / r['rsync_s']:.2f}× | {r['agent_s'] / r['rsync_s']:.3f}× | "
            f"{r['hand_rss_kib'] / 1024:.0f} / {r['agent_rss_kib'] / 1024:.0f} / {r['rsync_rss_kib'] / 1024:.0f} MB |")
    lines += ["", "Phase medians (ms):", ""]
    for r in rows:
        lines.append(f"- {r['label']}: by hand {r['hand_phases_ms']}; agent {r['agent_phases_ms']} (walks: {', '.join(map(str, r['agent_modes']))})")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    if WORK.exists():
        for m in WORK.glob("*"):
            subprocess.run(["umount", str(m)], check=False, capture_output=True)
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    store = WORK / "store"
    key = WORK / "bench.key"
    run([BIN, "keygen", "--out", str(key)])
    rows = []
    for base, target, label in CASES:
        rows.append(bench_case(base, target, label, store, key))
        log(json.dumps(rows[-1]))
    write_results(rows)


if __name__ == "__main__":
    main()
