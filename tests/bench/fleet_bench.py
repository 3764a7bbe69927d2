#!/usr/bin/env python3
"""Driver of tests/bench/fleet-bench.sh (see there): `fleet_bench.py [N]`.

Per case (v1 -> v3, v1 -> v2) and tool (imageupd fleet, rsync -az), a fresh
set of N node roots is made: one full `cp -a` of v1 (the case's template),
then `cp -al` of it per node (a hard-link farm: every node root has its own
directories, its files share inodes with the template and the other nodes).
That is safe for both tools here: imageupd replaces every file it changes by
a new inode (rename), and rsync without --inplace writes a temporary file and
renames it; only a metadata-only change (chmod/chown/utime of an unchanged
file) would touch a shared inode in place, and after each case the template
is compared with the source tree (`rsync -ani`, itemised) and the result
reported. Node state (etc/imageupd, var/lib/imageupd, etc/image_id,
meta.json, hooks) is written as new files, never into a shared inode.

imageupd: one `imageupd serve` over the published store, one etcd, one
`imageupd agent` per node (group `compute`, max_unavailable = K, poll_ms
200, lease 10 s), each node adopted at v1 first; its pre-apply hook appends
a timestamp and sleeps BENCH_HOOK_SLEEP (a service stop/restart modelled
as a sleep, no real service), its post-apply hook appends a timestamp. No
health checks (the gate passes at once). The metadata of every node is
flipped at once; the run ends when every node runs the target and etcd has
no claim and no in-progress record.

rsync: one `rsync --daemon --no-detach` on loopback serving the trees; the
same N nodes (fresh roots) each run the same hooks around
`rsync -az --delete --numeric-ids --stats` (rsync writes the live root, so
the whole transfer is inside the window), at most K at a time.

Server CPU: utime+stime (+ cutime+cstime of reaped children for the rsync
daemon, which forks one child per connection) from /proc/<pid>/stat, from
the metadata change to the last node done, and the same from
`/usr/bin/time -v` of the whole server process as a cross-check.
"""

import concurrent.futures as cf
import calendar
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import base64
from pathlib import Path

from benchlib import free_port, run, wait_port

REPO = Path(__file__).resolve().parents[2]
BIN = os.environ["IMAGEUPD_BIN"]
N = int(sys.argv[1]) if len(sys.argv) > 1 else 50
K = int(os.environ.get("BENCH_K", "5"))
LEVEL = os.environ.get("BENCH_LEVEL", "19")
WORK = Path(os.environ.get("BENCH_DIR", "/var/tmp/imageupd-fleet-bench"))
TREES_DIR = Path(os.environ.get("BENCH_TREES", os.environ.get("IMAGEUPD_TEST_CACHE", "/var/cache/imageupd-test")))
RESULTS = Path(os.environ.get("BENCH_RESULTS", REPO / "tests/bench/fleet-results.md"))
HOOK_SLEEP = os.environ.get("BENCH_HOOK_SLEEP", "1")
KEEP = os.environ.get("BENCH_KEEP") == "1"
TREES = {i: TREES_DIR / i for i in ("v1", "v2", "v3")}
CLK = os.sysconf("SC_CLK_TCK")
PREFIX = "/imageupd"
GROUP = "compute"
procs = []  # every long-lived process we started
server_pids = []  # servers run under /usr/bin/time (signalled directly)
shm_dirs = []
node_roots = []


def log(*a):
    print("fleet-bench:", *a, file=sys.stderr, flush=True)


def stop(p, sig=signal.SIGTERM):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def children(pid):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                st = (d / "stat").read_text()
            except OSError:
                continue
            if int(st.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def cpu_s(pid, with_children):
    """utime+stime (and cutime+cstime) of PID, seconds."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the comm: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
    t = int(f[11]) + int(f[12])
    if with_children:
        t += int(f[13]) + int(f[14])
    return t / CLK


def sched_ns(pid):
    """{tid: ns on a CPU} from /proc/PID/task/*/schedstat (first field):
    finer than clock ticks; a thread that exits is not seen."""
    t = {}
    for d in Path(f"/proc/{pid}/task").iterdir():
        try:
            t[d.name] = int((d / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return t


def sched_delta_s(a, b):
    """CPU seconds of the threads alive at B since A (new threads count whole)."""
    return sum(v - a.get(k, 0) for k, v in b.items()) / 1e9


def live_cpu_s(pid):
    """CPU of PID's live children (not yet reaped), seconds."""
    t = 0.0
    for c in children(pid):
        try:
            t += cpu_s(c, True)
        except OSError:
            pass
    return t


def rss_kib(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def hwm_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """Peak of the summed RSS of PID and its children, every 50 ms."""

    def __init__(self, pid):
        self.pid, self.peak, self.stop_ev = pid, 0, threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        while not self.stop_ev.is_set():
            tot = rss_kib(self.pid) + sum(rss_kib(c) for c in children(self.pid))
            self.peak = max(self.peak, tot)
            self.stop_ev.wait(0.05)

    def finish(self):
        self.stop_ev.set()
        self.t.join()
        return self.peak


def timed_server(cmd, tag, port, **kw):
    """Start CMD under /usr/bin/time -v; (time proc, server pid, time file)."""
    tf = WORK / f"time-{tag}.txt"
    p = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(tf)] + [str(c) for c in cmd],
                         stdin=subprocess.DEVNULL, **kw)
    procs.append(p)
    wait_port(port, p, tag)
    kids = children(p.pid)
    assert len(kids) == 1, kids
    server_pids.append(kids[0])
    return p, kids[0], tf


def stop_timed(p, spid):
    """SIGTERM the server itself (GNU time would die alone), then reap time."""
    if p.poll() is None:
        try:
            os.kill(spid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            try:
                os.kill(spid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def time_v(tf):
    t = tf.read_text()
    g = lambda k: float(re.search(rf"{re.escape(k)}: ([\d.]+)", t).group(1))
    return {"cpu": g("User time (seconds)") + g("System time (seconds)"),
            "maxrss_kib": g("Maximum resident set size (kbytes)")}


# ---------------------------------------------------------------------------
# etcd


class Etcd:
    def __init__(self):
        self.data = Path(tempfile.mkdtemp(prefix="imageupd-fleet-bench-etcd-", dir="/dev/shm"))
        shm_dirs.append(self.data)
        self.port, peer = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        purl = f"http://127.0.0.1:{peer}"
        self.proc = subprocess.Popen(
            ["/usr/bin/etcd", "--name", "b1", "--data-dir", str(self.data / "d"),
             "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
             "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
             "--initial-cluster", f"b1={purl}", "--initial-cluster-state", "new"],
            stdin=subprocess.DEVNULL, stdout=open(self.data / "etcd.log", "w"),
            stderr=subprocess.STDOUT)
        procs.append(self.proc)
        t0 = time.time()
        while True:
            try:
                self.count("x")
                break
            except OSError:
                if time.time() - t0 > 30 or self.proc.poll() is not None:
                    raise SystemExit("etcd did not come up")
                time.sleep(0.1)

    def count(self, prefix):
        k = prefix.encode()
        end = k[:-1] + bytes([k[-1] + 1])
        body = json.dumps({"key": base64.b64encode(k).decode(),
                           "range_end": base64.b64encode(end).decode(),
                           "count_only": True}).encode()
        req = urllib.request.Request(self.url + "/v3/kv/range", body)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as r:
            return int(json.loads(r.read()).get("count", 0))

    def stop(self):
        stop(self.proc)


# ---------------------------------------------------------------------------
# Nodes


def runtime_dir(root):
    h = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()
    return Path("/run/imageupd/roots") / h[:16]


def write_new(path, text, mode=0o644):
    """Write PATH as a new inode (never into a shared, hard-linked one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def template(case, key_pub):
    t = WORK / f"tmpl-{case}"
    shutil.rmtree(t, ignore_errors=True)
    run(["cp", "-a", "--reflink=auto", f"{TREES['v1']}", str(t)])
    if key_pub:
        td = t / "etc/imageupd/trusted.d"
        td.mkdir(parents=True, exist_ok=True)
        shutil.copy(key_pub, td / "bench.pub")
    return t


def template_clean(t, with_key):
    """Itemised differences of the template from v1 after the case (a
    shared inode changed in place would show here)."""
    out = run(["rsync", "-anciHAX", "--delete", "--numeric-ids", "--exclude=/etc/imageupd/",
               f"{TREES['v1']}/", f"{t}/"])
    # Directories are never shared (cp -al makes new ones): only entries
    # that are not directories count.
    return [l for l in out.splitlines() if l.strip() and not (len(l) > 1 and l[1] == "d")]


def farm(t, case, n):
    nodes = []
    for i in range(n):
        d = WORK / case / f"node{i:02d}"
        d.mkdir(parents=True)
        run(["cp", "-al", str(t), str(d / "root")])
        node_roots.append(d / "root")
        nodes.append({"id": f"node{i:02d}", "dir": d, "root": d / "root"})
    return nodes


def hooks(node, events):
    nid = node["id"]
    pre = (f"#!/bin/bash\necho \"{nid} pre $(date +%s%N)\" >> {events}\nsleep {HOOK_SLEEP}\n")
    post = f"#!/bin/bash\necho \"{nid} post $(date +%s%N)\" >> {events}\n"
    h = node["root"] / "etc/imageupd/hooks"
    write_new(h / "pre-apply.d/10-quiesce", pre, 0o755)
    write_new(h / "post-apply.d/90-resume", post, 0o755)
    return h


def read_events(events):
    ev = {}
    if events.exists():
        for l in events.read_text().splitlines():
            f = l.split()
            if len(f) == 3:
                ev.setdefault(f[0], {})[f[1]] = int(f[2]) / 1e9
    return ev


TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)\s+\w+\s+(.*)$")


def log_times(path, since):
    """First 'rollout: waiting' / 'rollout: holding' and the 'released slot'
    after SINCE, epoch seconds, from an agent log."""
    out = {}
    for l in path.read_text(errors="replace").splitlines():
        m = TS.match(re.sub(r"\x1b\[[0-9;]*m", "", l))
        if not m:
            continue
        base, _, frac = m.group(1).rstrip("Z").partition(".")
        try:
            t = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))
        except ValueError:
            continue
        if t < since:
            continue
        msg = m.group(2)
        if msg.startswith("rollout: waiting") and "wait" not in out:
            out["wait"] = t
        elif msg.startswith("rollout: holding") and "hold" not in out:
            out["hold"] = t
            out.setdefault("wait", t)
        elif msg.startswith("rollout: released slot"):
            out["release"] = t
    return out


def cleanup_nodes(nodes):
    for n in nodes:
        rt = runtime_dir(n["root"])
        shutil.rmtree(rt, ignore_errors=True)
    for n in nodes:
        shutil.rmtree(n["dir"], ignore_errors=True)


# ---------------------------------------------------------------------------
# The imageupd fleet


def imageupd_case(to, store, key):
    case = f"imageupd-{to}"
    log(f"{case}: making {N} node roots")
    t = template(case, f"{key}.pub")
    nodes = farm(t, case, N)
    etcd = Etcd()
    port = free_port()
    srv, spid, tf = timed_server([BIN, "serve", "--store", store, "--listen", f"127.0.0.1:{port}"],
                                 case, port, stdout=subprocess.DEVNULL,
                                 stderr=open(WORK / f"{case}-serve.log", "w"),
                                 env={**os.environ, "IMAGEUPD_LOG": "warn"})
    url = f"http://127.0.0.1:{port}/"
    events = WORK / case / "events.log"

    def adopt(n):
        # Adoption at v1 (from the local store), before the hooks exist.
        run([BIN, "apply", "--from", store, "--id", "v1", "--root", n["root"], "--json"])

    log(f"{case}: adopting {N} roots at v1")
    with cf.ThreadPoolExecutor(2) as ex:
        list(ex.map(adopt, nodes))
    agents = []
    try:
        for n in nodes:
            n["meta"] = n["dir"] / "meta.json"
            write_new(n["meta"], json.dumps({"image_id": "v1", "image_source": url}))
            hooks(n, events)
            write_new(n["root"] / "etc/imageupd/config.toml", f"""[agent]
metadata_file = "{n['meta']}"
debounce_ms = 100
rescan_secs = 1
backoff_min_secs = 1
backoff_max_secs = 2

[health]
timeout_secs = 20

[rollout]
etcd = ["{etcd.url}"]
group = "{GROUP}"
prefix = "{PREFIX}"
node_id = "{n['id']}"
lease_secs = 10
poll_ms = 200
max_unavailable = {K}
""")
            lf = open(n["dir"] / "agent.log", "w")
            a = subprocess.Popen([BIN, "agent", "--root", str(n["root"])], stdin=subprocess.DEVNULL,
                                 stdout=lf, stderr=subprocess.STDOUT,
                                 env={**os.environ, "IMAGEUPD_LOG": "info"})
            procs.append(a)
            agents.append(a)
        t0 = time.time()
        while etcd.count(f"{PREFIX}/groups/{GROUP}/nodes/") < N:
            if time.time() - t0 > 120:
                raise SystemExit(f"{case}: not every agent registered")
            time.sleep(0.2)
        time.sleep(2)  # let every agent settle at v1
        a_cpu0 = sum(cpu_s(a.pid, True) for a in agents)
        cpu0 = cpu_s(spid, False)
        ns0 = sched_ns(spid)
        log(f"{case}: flipping {N} nodes to {to}")
        flip = time.time()
        for n in nodes:
            write_new(n["meta"], json.dumps({"image_id": to, "image_source": url}))
        last = None
        while True:
            on = sum((n["root"] / "etc/image_id").read_text().strip() == to
                     if (n["root"] / "etc/image_id").exists() else 0 for n in nodes)
            if on == N and etcd.count(f"{PREFIX}/groups/{GROUP}/claims/") == 0 \
                    and etcd.count(f"{PREFIX}/groups/{GROUP}/inprogress/") == 0:
                break
            if time.time() - flip > 900:
                raise SystemExit(f"{case}: only {on}/{N} nodes on {to} after 900 s")
            if last != on:
                last = on
            time.sleep(0.1)
        done_poll = time.time()
        cpu1 = cpu_s(spid, False)
        ns1 = sched_ns(spid)
        a_cpu1 = sum(cpu_s(a.pid, True) for a in agents)
        hwm = hwm_kib(spid)
    finally:
        for a in agents:
            stop(a)
        stop_timed(srv, spid)
        etcd.stop()
    tv = time_v(tf)
    ev = read_events(events)
    per = []
    for n in nodes:
        lt = log_times(n["dir"] / "agent.log", flip)
        st = json.loads(run([BIN, "status", "--json", "--root", n["root"]]))
        dl = ((st.get("agent") or {}).get("last_applied") or {}).get("download") or {}
        e = ev.get(n["id"], {})
        per.append({"id": n["id"], "bytes": dl.get("bytes"), "requests": dl.get("requests"),
                    "wait": lt.get("wait"), "hold": lt.get("hold"), "release": lt.get("release"),
                    "pre": e.get("pre"), "post": e.get("post")})
    bad = [p["id"] for p in per if None in (p["bytes"], p["hold"], p["release"], p["pre"], p["post"])]
    if bad:
        raise SystemExit(f"{case}: incomplete records for {bad[:5]}: {per[0]}")
    done = max(max(p["release"] for p in per), max(p["post"] for p in per))
    diff = template_clean(t, True)
    cleanup_nodes(nodes)
    shutil.rmtree(WORK / case, ignore_errors=True)
    shutil.rmtree(t, ignore_errors=True)
    windows = [p["release"] - p["pre"] for p in per]
    r = {
        "wall": done - flip, "wall_poll": done_poll - flip,
        "cpu": cpu1 - cpu0, "cpu_sched": sched_delta_s(ns0, ns1), "cpu_time_v": tv["cpu"], "rss_kib": hwm, "rss_time_v": tv["maxrss_kib"],
        "bytes": statistics.median(p["bytes"] for p in per), "bytes_max": max(p["bytes"] for p in per),
        "requests": statistics.median(p["requests"] or 0 for p in per),
        "stage": max(p["wait"] - flip for p in per),
        "stage_median": statistics.median(p["wait"] - flip for p in per),
        "slot_wait": statistics.mean(p["hold"] - p["wait"] for p in per),
        "flip_to_pre": statistics.mean(p["pre"] - flip for p in per),
        "window": statistics.median(windows), "window_max": max(windows),
        "hook_window": statistics.median(p["post"] - p["pre"] for p in per),
        "node_cpu": (a_cpu1 - a_cpu0) / N,
        "max_open": max_open([(p["pre"], p["release"]) for p in per]),
        "template_diff": diff,
    }
    log(f"{case}: {json.dumps({k: v for k, v in r.items() if k != 'template_diff'})}")
    return r


def max_open(iv):
    ev = sorted([(a, 1) for a, b in iv] + [(b, -1) for a, b in iv], key=lambda x: (x[0], x[1]))
    cur = m = 0
    for _, d in ev:
        cur += d
        m = max(m, cur)
    return m


# ---------------------------------------------------------------------------
# rsync


def rsync_case(to):
    case = f"rsync-{to}"
    log(f"{case}: making {N} node roots")
    t = template(case, None)
    nodes = farm(t, case, N)
    events = WORK / case / "events.log"
    for n in nodes:
        # The same hooks, outside the root (rsync --delete would remove them).
        d = n["dir"] / "hooks"
        pre = f"#!/bin/bash\necho \"{n['id']} pre $(date +%s%N)\" >> {events}\nsleep {HOOK_SLEEP}\n"
        post = f"#!/bin/bash\necho \"{n['id']} post $(date +%s%N)\" >> {events}\n"
        write_new(d / "pre", pre, 0o755)
        write_new(d / "post", post, 0o755)
    port = free_port()
    conf = WORK / f"{case}-rsyncd.conf"
    conf.write_text(f"""pid file = {WORK}/{case}-rsyncd.pid
use chroot = no
max connections = 0
[trees]
path = {TREES_DIR}
read only = yes
uid = root
gid = root
""")
    srv, spid, tf = timed_server(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
                                  "--address=127.0.0.1"], case, port, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    sampler = RssSampler(spid)
    time.sleep(0.5)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0 = cpu_s(spid, True) + live_cpu_s(spid)

    def one(n):
        run([n["dir"] / "hooks/pre"])
        out = run(["rsync", "-az", "--delete", "--numeric-ids", "--stats",
                   f"rsync://127.0.0.1:{port}/trees/{to}/", f"{n['root']}/"])
        run([n["dir"] / "hooks/post"])
        g = lambda k: int(re.search(rf"{k}: ([\d,]+)", out).group(1).replace(",", ""))
        return {"recv": g("Total bytes received"), "sent": g("Total bytes sent"), "done": time.time()}

    log(f"{case}: {N} nodes pulling {to}, {K} at a time")
    flip = time.time()
    try:
        with cf.ThreadPoolExecutor(K) as ex:
            res = list(ex.map(one, nodes))
        done = max(r["done"] for r in res)
        # Let the daemon reap its last children.
        t1 = time.time()
        while children(spid) and time.time() - t1 < 10:
            time.sleep(0.05)
        cpu1 = cpu_s(spid, True) + live_cpu_s(spid)
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        peak = sampler.finish()
        stop_timed(srv, spid)
    tv = time_v(tf)
    ev = read_events(events)
    windows = [ev[n["id"]]["post"] - ev[n["id"]]["pre"] for n in nodes]
    diff = template_clean(t, False)
    cleanup_nodes(nodes)
    shutil.rmtree(WORK / case, ignore_errors=True)
    shutil.rmtree(t, ignore_errors=True)
    r = {
        "wall": done - flip, "cpu": cpu1 - cpu0, "cpu_time_v": tv["cpu"],
        "rss_kib": peak, "rss_time_v": tv["maxrss_kib"],
        "bytes": statistics.median(x["recv"] for x in res),
        "bytes_total": statistics.median(x["recv"] + x["sent"] for x in res),
        "flip_to_pre": statistics.mean(ev[n["id"]]["pre"] - flip for n in nodes),
        "window": statistics.median(windows), "window_max": max(windows),
        "node_cpu": ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) / N,
        "template_diff": diff,
    }
    log(f"{case}: {json.dumps({k: v for k, v in r.items() if k != 'template_diff'})}")
    return r


# ---------------------------------------------------------------------------


def kib(n):
    if n < 10 * 1024:
        return f"{n:,.0f} B"
    return f"{n / 1024:,.0f} KiB"


def write_results(res, meta):
    L = ["# Fleet benchmark (tests/bench/fleet-bench.sh)\n"]
    L.append(f"{N} simulated nodes, max_unavailable = {K}, one run per case (no medians "
             f"across runs; per-node figures are medians over the {N} nodes unless said). "
             f"Fixture trees v1/v2/v3 ({TREES_DIR}); publish level {LEVEL}; loopback; "
             f"{os.cpu_count()} cores; {meta['when']}. Pre-apply hook: a timestamp and "
             f"`sleep {HOOK_SLEEP}` (a service restart modelled as a sleep, no real service); "
             f"post-apply hook: a timestamp; no health checks. Agents: poll_ms 200, "
             f"lease_secs 10. rsync: the same hooks around `rsync -az --delete --numeric-ids "
             f"--stats` from one daemon, {K} nodes at a time (rsync writes the live root, so "
             f"the transfer is inside the window).\n")
    L.append("| | v1 → v3 (hotfix) imageupd | rsync | ratio | v1 → v2 (package) imageupd | rsync | ratio |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    a3, r3, a2, r2 = res["imageupd-v3"], res["rsync-v3"], res["imageupd-v2"], res["rsync-v2"]

    def row(name, f, key, rk=None, ratio=True):
        rk = rk or key
        cells = []
        for a, r in ((a3, r3), (a2, r2)):
            av, rv = a.get(key), r.get(rk)
            cells += [f(av) if av is not None else "–", f(rv) if rv is not None else "–",
                      (f"{av / rv:.3f}" if ratio and av is not None and rv else "–")]
        L.append(f"| {name} | " + " | ".join(cells) + " |")

    sec = lambda v: f"{v:.1f} s"
    ms = lambda v: f"{v * 1000:.0f} ms"
    row("wall, metadata change → last node done", sec, "wall")
    row("server CPU, total (/proc stat, 10 ms ticks)", lambda v: f"{v:.2f} s", "cpu")
    row("**server CPU per node update**", lambda v: f"{v * 1000:.2f} ms", "cpu_best_n")
    row("server CPU per node, /proc stat ticks only", lambda v: f"{v * 1000:.1f} ms", "cpu_n")
    row("server CPU per node (`/usr/bin/time -v`, whole server life)", lambda v: f"{v * 1000:.1f} ms", "cpu_tv_n")
    L.append(f"| imageupd serve CPU per node by its threads' schedstat (ns) | "
             f"{a3['cpu_sched'] / N * 1000:.2f} ms | | | {a2['cpu_sched'] / N * 1000:.2f} ms | | |")
    row("bytes per node (received)", kib, "bytes")
    row("bytes per node (rsync: sent + received)", kib, "bytes", "bytes_total")
    row("peak server RSS (rsync: daemon + children, summed)", lambda v: f"{v / 1024:.1f} MiB", "rss_kib")
    row("node CPU per node (agent + hooks / rsync client + hooks)", lambda v: f"{v * 1000:.0f} ms", "node_cpu", ratio=False)
    row("one node's window (median)", ms, "window")
    row("longest window", ms, "window_max")
    row("mean metadata change → pre-apply start", sec, "flip_to_pre", ratio=False)
    L.append("")
    L.append("imageupd only:\n")
    L.append("| | v1 → v3 | v1 → v2 |")
    L.append("|---|---:|---:|")
    for name, key, f in (("stage time (metadata change → last node waiting for a slot)", "stage", sec),
                         ("stage time, median node", "stage_median", sec),
                         ("**mean wait for a slot** (waiting → holding, agent log)", "slot_wait", sec),
                         ("window: pre-apply start → post-apply end (hooks)", "hook_window", ms),
                         ("most windows open at once (pre-apply start → slot released)", "max_open", str),
                         ("HTTP requests per node", "requests", lambda v: f"{v:.0f}"),
                         ("largest download of a node", "bytes_max", kib),
                         ("wall by the driver's 100 ms poll (image_id + no claims)", "wall_poll", sec)):
        L.append(f"| {name} | {f(a3[key])} | {f(a2[key])} |")
    L.append("\nGoals:\n")
    for to, a, r in (("v3", a3, r3), ("v2", a2, r2)):
        ratio = a["cpu_best_n"] / r["cpu_n"] if r["cpu_n"] else float("nan")
        pred = N / K * a["window"] + a["stage"]
        L.append(f"- v1 → {to}: server CPU per node / rsync daemon's = **{ratio:.3f}** (goal ≤ 0.05: "
                 f"{'met' if ratio <= 0.05 else 'NOT met'})")
        L.append(f"- v1 → {to}: wall {a['wall']:.1f} s vs (N / K) × window + stage = {N}/{K} × "
                 f"{a['window']:.2f} s + {a['stage']:.1f} s = {pred:.1f} s: **{a['wall'] / pred:.2f}×** "
                 f"(goal ≤ 1.2: {'met' if a['wall'] / pred <= 1.2 else 'NOT met'}); with whole rounds, "
                 f"⌈N / K⌉ = {-(-N // K)}: {a['wall'] / (-(-N // K) * a['window'] + a['stage']):.2f}×; "
                 f"rsync, {K} at a time: {r['wall']:.1f} s")
    L.append("\nDefinitions: *server CPU per node update* is the server's CPU from the metadata "
             "change to the last node done, divided by N. For `imageupd serve` (one process, tokio "
             "threads) the larger of utime+stime from /proc/<pid>/stat (10 ms ticks) and the sum over "
             "its threads of /proc/<pid>/task/*/schedstat (ns; threads alive at the end); for the rsync "
             "daemon utime+stime plus cutime+cstime of its reaped forked children (one per "
             "connection) plus any still alive. In detail: *server CPU, total* is utime+stime from /proc/<pid>/stat between the metadata "
             "change and the last node done — for `imageupd serve` its own (one process, all threads); "
             "for the rsync daemon its own plus its reaped forked children (cutime+cstime) plus any "
             "still alive; the `/usr/bin/time -v` row is the same over the server's whole life "
             "(start-up, adoption-time idle, shutdown included). *Peak RSS*: imageupd serve's VmHWM; "
             "rsync: the largest sum of the daemon's and its children's RSS sampled every 50 ms "
             "(`/usr/bin/time -v` max RSS of a single process: "
             f"{r3['rss_time_v'] / 1024:.1f} / {r2['rss_time_v'] / 1024:.1f} MiB). *Window*: pre-apply "
             "hook start → the agent's `released slot` log line (covers hooks, swap, gate, release). "
             "*Last node done*: the latest `released slot` / post-apply timestamp. *Stage*: metadata "
             "change → the node's first `rollout: waiting`/`holding` line (fetch, verify, stage, sync done). "
             "imageupd bytes: `status --json` agent.last_applied.download.bytes (through the update delta).")
    L.append("\nNode roots: one `cp -a` of v1 per case, then `cp -al` per node (hard-link farm; "
             "both tools replace changed files by rename). Template after each case compared with v1 "
             "(`rsync -anciHAX`, itemised lines; 0 = no shared inode was changed in place): " +
             ", ".join(f"{c} {len(res[c]['template_diff'])}" for c in res) + ".")
    if meta.get("note"):
        L.append("\n" + meta["note"])
    RESULTS.write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    store, key = WORK / "store", WORK / "bench.key"
    stamp = WORK / "store.stamp"
    want = json.dumps({"trees": str(TREES_DIR), "level": LEVEL,
                       "mtimes": [os.stat(TREES[i]).st_mtime for i in TREES]})
    reuse = stamp.exists() and stamp.read_text() == want and key.exists()
    for c in list(WORK.iterdir()):
        if reuse and c.name in ("store", "store.stamp", "bench.key", "bench.key.pub"):
            continue
        shutil.rmtree(c, ignore_errors=True) if c.is_dir() else c.unlink()
    if reuse:
        log("reusing the published store (BENCH_KEEP=1 kept it)")
    else:
        run([BIN, "keygen", "--out", key])
        for i, parent in (("v1", None), ("v2", "v1"), ("v3", "v1")):
            cmd = [BIN, "publish", "--store", store, "--id", i, "--key", key, "--level", LEVEL]
            if parent:
                cmd += ["--parent", parent]
            t0 = time.time()
            run(cmd + [TREES[i]])
            log(f"published {i} in {time.time() - t0:.1f} s")
        stamp.write_text(want)
    res = {}
    for to in ("v3", "v2"):
        res[f"imageupd-{to}"] = imageupd_case(to, store, key)
        res[f"rsync-{to}"] = rsync_case(to)
    for k, v in res.items():
        # imageupd serve: the finer of the two (its CPU is a few clock ticks).
        v["cpu_best"] = max(v["cpu"], v.get("cpu_sched", 0))
        v["cpu_best_n"] = v["cpu_best"] / N
        v["cpu_n"] = v["cpu"] / N
        v["cpu_tv_n"] = v["cpu_time_v"] / N
    (WORK / "fleet-bench-raw.json").write_text(json.dumps(res))
    write_results(res, {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "note": os.environ.get("BENCH_NOTE", "")})
    return res


def cleanup():
    for pid in server_pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in reversed(procs):
        try:
            stop(p)
        except Exception:
            pass
    for r in node_roots:
        shutil.rmtree(runtime_dir(r), ignore_errors=True)
    for d in shm_dirs:
        shutil.rmtree(d, ignore_errors=True)
    if not KEEP:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    try:
        main()
    finally:
        cleanup()
