#!/usr/bin/env python3
"""Driver of tests/bench/net-bench.sh (see there). Everything runs on
loopback; every server it starts is stopped at the end. Environment:

  IMAGEUPD_BIN        the imageupd binary (release)
  BENCH_RUNS          timed runs per case (>= 5, default 5)
  BENCH_LEVEL         zstd level of the publish (default 19)
  BENCH_DIR           scratch (default /var/tmp/imageupd-net-bench)
  BENCH_WRK_SECONDS   duration of one throughput run (default 10)
  IMAGEUPD_TEST_CACHE fixture trees (default /var/cache/imageupd-test)
  BENCH_REPORT_ONLY   set: only rewrite the results from the last run's raw
                      numbers (BENCH_DIR/net-bench-raw.json)
"""

import hashlib
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
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
LEVEL = os.environ.get("BENCH_LEVEL", "19")
WORK = Path(os.environ.get("BENCH_DIR", "/var/tmp/imageupd-net-bench"))
WRK_SECONDS = int(os.environ.get("BENCH_WRK_SECONDS", "10"))
CACHE = Path(os.environ.get("IMAGEUPD_TEST_CACHE", "/var/cache/imageupd-test"))
RESULTS = REPO / "tests/bench/net-results.md"
TREES = {i: CACHE / i for i in ("v1", "v2", "v3")}
procs = []


def log(*a):
    print("net-bench:", *a, file=sys.stderr, flush=True)


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


def kib(n):
    if n < 10 * 1024:
        return f"{n:,.0f} B"
    return f"{n / 1024:,.0f} KiB"


# ---------------------------------------------------------------------------
# Servers.


def serve(store):
    port = free_port()
    log_f = open(WORK / f"serve-{port}.log", "w")
    p = start([BIN, "serve", "--store", str(store), "--listen", f"127.0.0.1:{port}"],
              port, "imageupd serve", stdout=subprocess.DEVNULL, stderr=log_f,
              env={**os.environ, "IMAGEUPD_LOG": "warn"})
    return p, f"http://127.0.0.1:{port}/"


class Nginx:
    """A stock nginx serving ROOT; access log lines: status bytes request."""

    def __init__(self, root, name):
        self.dir = WORK / f"nginx-{name}"
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.dir / "tmp").mkdir(parents=True)
        self.port = free_port()
        d = self.dir
        conf = f"""daemon off; master_process off; worker_processes 1; user root;
pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
  log_format b '$status $body_bytes_sent "$request"';
  access_log {d}/access.log b;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  default_type application/octet-stream; sendfile on; keepalive_requests 100000;
  server {{ listen 127.0.0.1:{self.port}; root {root}; disable_symlinks on; }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        self.proc = start(["nginx", "-e", str(d / "startup.log"), "-p", str(d), "-c", str(d / "nginx.conf")],
                          self.port, "nginx", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/"

    def reset_log(self):
        (self.dir / "access.log").write_text("")
        # nginx keeps the file open; truncation is seen by its O_APPEND writes.

    def counts(self):
        n = b = 0
        errors = 0
        for line in (self.dir / "access.log").read_text().splitlines():
            st, by = line.split()[:2]
            n += 1
            b += int(by)
            errors += not st.startswith("2")
        return n, b, errors

    def stop(self):
        stop(self.proc)


# ---------------------------------------------------------------------------
# imageupd.


def publish(store, key):
    reps = {}
    for i, parent in (("v1", None), ("v2", "v1"), ("v3", "v1")):
        cmd = [BIN, "publish", "--store", str(store), "--id", i, "--key", str(key),
               "--level", LEVEL, "--json"]
        if parent:
            cmd += ["--parent", parent]
        t0 = time.time()
        reps[i] = json.loads(run(cmd + [str(TREES[i])]))
        reps[i]["wall_s"] = time.time() - t0
        log(f"published {i} in {reps[i]['wall_s']:.1f} s")
    return reps


def template(store, key):
    """An imageupd-installed v1 node (state + trusted key)."""
    t = WORK / "template-v1"
    if not t.exists():
        run(["cp", "-a", str(TREES["v1"]), str(t)])
        td = t / "etc/imageupd/trusted.d"
        td.mkdir(parents=True, exist_ok=True)
        shutil.copy(f"{key}.pub", td / "bench.pub")
        run([BIN, "apply", "--from", str(store), "--id", "v1", "--root", str(t)])
    return t


def fresh_root(tmpl):
    r = WORK / "root"
    run(["rsync", "-aHAX", "--delete", "--numeric-ids", f"{tmpl}/", f"{r}/"])
    return r


def empty_root(key):
    r = WORK / "root-empty"
    shutil.rmtree(r, ignore_errors=True)
    td = r / "etc/imageupd/trusted.d"
    td.mkdir(parents=True)
    shutil.copy(f"{key}.pub", td / "bench.pub")
    # The state directory exists before the plan scans the root (an apply
    # onto a root without /var trips over the /var it creates for its state).
    (r / "var/lib/imageupd").mkdir(parents=True)
    return r


def imageupd_apply(url, root, to, rss=False):
    """One apply; with RSS, its peak RSS (KiB) through /usr/bin/time."""
    t0 = time.time()
    cmd = [BIN, "apply", "--from", url, "--id", to, "--root", str(root), "--json"]
    rss_file = WORK / "apply-rss.txt"
    if rss and Path("/usr/bin/time").exists():
        cmd = ["/usr/bin/time", "-f", "%M", "-o", str(rss_file)] + cmd
    else:
        rss = False
    j = json.loads(run(cmd))
    d = j["download"]
    r = {"bytes": d["bytes"], "requests": d["requests"], "wall": time.time() - t0,
         "objects": d["objects"], "delta": d.get("delta"),
         "delta_objects": d.get("delta_objects", 0)}
    if rss:
        r["rss_kib"] = int(rss_file.read_text().split()[-1])
    return r


def without(src, dst, names):
    """A hard-linked copy of store SRC at DST without the files (or
    directories) NAMES under each images/<id>/."""
    shutil.rmtree(dst, ignore_errors=True)
    run(["cp", "-al", str(src), str(dst)])
    for i in ("v1", "v2", "v3"):
        for f in names:
            p = dst / "images" / i / f
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return dst


# ---------------------------------------------------------------------------
# Competitors.


def rsync_daemon():
    port = free_port()
    conf = WORK / "rsyncd.conf"
    conf.write_text(f"""pid file = {WORK}/rsyncd.pid
use chroot = no
[trees]
path = {CACHE}
read only = yes
uid = root
gid = root
""")
    p = start(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}",
               "--address=127.0.0.1"], port, "rsync daemon", stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    return p, port


def rsync_update(port, to, base):
    dst = WORK / "rsync-dst"
    if base:
        run(["rsync", "-aHAX", "--delete", "--numeric-ids", f"{TREES[base]}/", f"{dst}/"])
    else:
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
    t0 = time.time()
    out = run(["rsync", "-az", "--delete", "--numeric-ids", "--stats",
               f"rsync://127.0.0.1:{port}/trees/{to}/", f"{dst}/"])
    wall = time.time() - t0
    sent = int(re.search(r"Total bytes sent: ([\d,]+)", out).group(1).replace(",", ""))
    recv = int(re.search(r"Total bytes received: ([\d,]+)", out).group(1).replace(",", ""))
    return {"bytes": sent + recv, "wall": wall, "requests": 1}


def ostree_repo():
    repo = WORK / "ostree-repo"
    if (repo / "config").exists():
        return repo, json.loads((WORK / "ostree-commits.json").read_text())
    shutil.rmtree(repo, ignore_errors=True)
    run(["ostree", "init", "--mode=archive", f"--repo={repo}"])
    commits = {}
    for i in ("v1", "v2", "v3"):
        # OSTree stores no device nodes or fifos: commit a copy without them.
        t = WORK / f"ostree-tree-{i}"
        run(["rsync", "-aHAX", "--delete", "--numeric-ids", "--no-devices", "--no-specials",
             f"{TREES[i]}/", f"{t}/"])
        log(f"ostree commit {i}")
        out = run(["ostree", "commit", f"--repo={repo}", f"--branch=bench/{i}",
                   f"--tree=dir={t}", "--no-bindings", f"--subject={i}"])
        commits[i] = out.strip()
    for to in ("v2", "v3"):
        log(f"ostree static-delta v1 -> {to}")
        run(["ostree", "static-delta", "generate", f"--repo={repo}",
             f"--from={commits['v1']}", f"--to={commits[to]}"])
    run(["ostree", "summary", "-u", f"--repo={repo}"])
    (WORK / "ostree-commits.json").write_text(json.dumps(commits))
    return repo, commits


def ostree_pull(ngx, commits, to, delta):
    c = WORK / "ostree-client"
    shutil.rmtree(c, ignore_errors=True)
    run(["ostree", "init", "--mode=bare", f"--repo={c}"])
    run(["ostree", "remote", "add", f"--repo={c}", "--no-gpg-verify", "origin",
         f"{ngx.url}ostree-repo"])
    # The client starts at v1 (not counted).
    run(["ostree", "pull", f"--repo={c}", "--disable-static-deltas", "origin", commits["v1"]])
    ngx.reset_log()
    t0 = time.time()
    flag = "--require-static-deltas" if delta else "--disable-static-deltas"
    run(["ostree", "pull", f"--repo={c}", flag, "origin", commits[to]])
    wall = time.time() - t0
    n, b, _ = ngx.counts()
    return {"bytes": b, "requests": n, "wall": wall}


def file_digest(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def regular_files(root):
    out = {}
    for dp, dns, fns in os.walk(root):
        for n in fns:
            p = Path(dp) / n
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = p
    return out


def floor_bytes(frm, to):
    """Changed + added files, each zstd -19 (with --patch-from its old
    version where one exists), each distinct content once."""
    old = regular_files(TREES[frm])
    old_digests = {file_digest(p) for p in old.values()}
    new = regular_files(TREES[to])
    total = 0
    files = 0
    seen = set()
    tmp = WORK / "floor.zst"
    for rel, p in sorted(new.items()):
        if p.stat().st_size == 0:
            continue
        d = file_digest(p)
        if d in old_digests or d in seen:
            continue
        seen.add(d)
        files += 1
        cmd = ["zstd", "-q", "-f", "-19", "--long=27", str(p), "-o", str(tmp)]
        if rel in old:
            cmd[3:3] = [f"--patch-from={old[rel]}"]
        run(cmd)
        total += tmp.stat().st_size
    return total, files


def tar_zstd_bytes(tree):
    out = WORK / "tree.tar.zst"
    run(["tar", "--numeric-owner", "--xattrs", "--acls", "-I", "zstd -19 -T0", "-cf", str(out),
         "-C", str(tree), "."])
    return out.stat().st_size


# ---------------------------------------------------------------------------
# Throughput.


def peak_rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def wrk_run(url, paths_file):
    script = WORK / "paths.lua"
    script.write_text(f"""
local paths = {{}}
for l in io.lines("{paths_file}") do paths[#paths + 1] = l end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "/" .. paths[(i % #paths) + 1])
end
""")
    out = run(["wrk", "-t", "2", "-c", "64", "-d", f"{WRK_SECONDS}s", "--timeout", "120s",
               "-s", str(script), url])
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    reqs = int(m.group(1))
    secs = float(m.group(2)) * {"s": 1, "m": 60, "ms": 0.001}[m.group(3)]
    size = float(m.group(4)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[m.group(5)]
    errs = 0
    e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if e:
        errs += sum(int(x) for x in e.groups())
    n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if n2:
        errs += int(n2.group(1))
    return {"mib_s": size / secs / (1 << 20), "req_s": reqs / secs, "errors": errs}


def throughput(store, srv_url, srv_proc, ngx):
    """64 connections fetching v1's objects (loose) and v1's packs."""
    objects = sorted(str(p.relative_to(store)) for p in (store / "objects").rglob("*") if p.is_file())
    packs = sorted(str(p.relative_to(store)) for p in (store / "packs").glob("*.pack"))
    res = {}
    for name, paths in (("loose objects", objects), ("packs", packs)):
        pf = WORK / f"paths-{name.replace(' ', '-')}.txt"
        pf.write_text("\n".join(paths) + "\n")
        for server, url in (("imageupd serve", srv_url), ("nginx", ngx.url)):
            runs = [wrk_run(url, pf) for _ in range(RUNS)]
            res[(name, server)] = {
                "mib_s": med([r["mib_s"] for r in runs]),
                "req_s": med([r["req_s"] for r in runs]),
                "errors": sum(r["errors"] for r in runs),
            }
            log(f"throughput {name} {server}: {res[(name, server)]}")
    return res, peak_rss_kib(srv_proc.pid)


# ---------------------------------------------------------------------------


def main():
    if RUNS < 5:
        raise SystemExit("BENCH_RUNS must be >= 5")
    WORK.mkdir(parents=True, exist_ok=True)
    for stale in ("store", "store-loose", "store-nodelta", "template-v1", "root", "root-empty"):
        shutil.rmtree(WORK / stale, ignore_errors=True)
    key = WORK / "bench.key"
    if not key.exists():
        run([BIN, "keygen", "--out", str(key)])
    store = WORK / "store"
    reps = publish(store, key)
    # The same store without update deltas (as published without --parent),
    # and as an older publisher wrote it (no pack indexes, no deltas).
    nodelta = without(store, WORK / "store-nodelta", ("deltas",))
    loose = without(store, WORK / "store-loose", ("packs.idx.zst", "packs.idx.zst.sig", "deltas"))
    tmpl = template(store, key)

    srv, url = serve(store)
    srv_nodelta, url_nodelta = serve(nodelta)
    srv_loose, url_loose = serve(loose)
    rows = {}
    for to in ("v2", "v3"):
        for name, u in (("imageupd (delta)", url), ("imageupd (packs, no delta)", url_nodelta),
                        ("imageupd (loose objects)", url_loose)):
            rs = [imageupd_apply(u, fresh_root(tmpl), to, rss=(name == "imageupd (delta)"))
                  for _ in range(RUNS)]
            rows[(to, name)] = rs
            log(f"v1 -> {to} {name}: {rs[0]['bytes']} bytes, {rs[0]['requests']} requests, "
                f"delta {rs[0]['delta']} ({rs[0]['delta_objects']} objects)")
            if name == "imageupd (delta)" and rs[0]["delta"] != "v1":
                raise SystemExit(f"v1 -> {to}: the delta was not used: {rs[0]}")
    for name, u in (("imageupd (packs)", url), ("imageupd (loose objects)", url_loose)):
        rs = [imageupd_apply(u, empty_root(key), "v1") for _ in range(RUNS)]
        rows[("full", name)] = rs
        log(f"full install {name}: {rs[0]['bytes']} bytes, {rs[0]['requests']} requests")

    rp, rport = rsync_daemon()
    for to, base in (("v2", "v1"), ("v3", "v1"), ("full", None)):
        rows[(to, "rsync -az (daemon)")] = [
            rsync_update(rport, "v1" if to == "full" else to, base) for _ in range(RUNS)]
        log(f"rsync {to}: {rows[(to, 'rsync -az (daemon)')][0]['bytes']} bytes")
    stop(rp)

    repo, commits = ostree_repo()
    site = WORK / "site"
    site.mkdir(exist_ok=True)
    link = site / "ostree-repo"
    link.mkdir(exist_ok=True)
    if not os.path.ismount(link):
        # nginx runs with disable_symlinks on; bind the repo in instead.
        run(["mount", "--bind", str(repo), str(link)])
    ngx_os = Nginx(site, "ostree")
    try:
        for to in ("v2", "v3"):
            rows[(to, "OSTree pull (objects)")] = [ostree_pull(ngx_os, commits, to, False) for _ in range(RUNS)]
            rows[(to, "OSTree pull (static delta)")] = [ostree_pull(ngx_os, commits, to, True) for _ in range(RUNS)]
            log(f"ostree {to}: {rows[(to, 'OSTree pull (objects)')][0]}")
    finally:
        ngx_os.stop()
        subprocess.run(["umount", str(link)])

    floors = {to: floor_bytes("v1", to) for to in ("v2", "v3")}
    tarz = tar_zstd_bytes(TREES["v1"])
    log(f"floors {floors}, tar.zst {tarz}")

    ngx = Nginx(store, "store")
    try:
        tput, rss = throughput(store, url, srv, ngx)
    finally:
        ngx.stop()
    stop(srv)
    stop(srv_nodelta)
    stop(srv_loose)
    raw = {"reps": reps, "rows": [[k[0], k[1], v] for k, v in rows.items()], "floors": floors,
           "tarz": tarz, "tput": [[k[0], k[1], v] for k, v in tput.items()], "rss": rss}
    (WORK / "net-bench-raw.json").write_text(json.dumps(raw))
    write_results(reps, rows, floors, tarz, tput, rss)


def report_only():
    """Write the results again from the last run's raw numbers."""
    raw = json.loads((WORK / "net-bench-raw.json").read_text())
    write_results(raw["reps"], {(a, b): v for a, b, v in raw["rows"]}, raw["floors"], raw["tarz"],
                  {(a, b): v for a, b, v in raw["tput"]}, raw["rss"])


def write_results(reps, rows, floors, tarz, tput, rss):
    L = []
    L.append("# Network benchmark (tests/bench/net-bench.sh)\n")
    L.append(f"Fixture trees v1/v2/v3 (tests/fixtures/build-trees.sh); publish level {LEVEL}; "
             f"medians of {RUNS} runs on loopback; machine: {os.cpu_count()} cores. "
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.\n")
    L.append("## Publish\n")
    L.append("| image | new objects | compressed | new packs | pack bytes | pack index "
             "| delta from parent (objects, patches) | delta build | wall |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, r in reps.items():
        p = r["packs"]
        dl = r.get("delta")
        dcol = (f"{kib(dl['bytes'])} ({dl['objects']}, {dl['patched_objects']})", f"{dl['ms'] / 1000:.1f} s") \
            if dl else ("–", "–")
        L.append(f"| {i} | {r['new_objects']} | {kib(r['new_object_bytes'])} | {p['new_packs']} | "
                 f"{kib(p['new_pack_bytes'])} | {kib(p['index_bytes'])} | {dcol[0]} | {dcol[1]} | "
                 f"{r['wall_s']:.1f} s |")
    for to, title in (("v2", "v1 → v2 (package update)"), ("v3", "v1 → v3 (one binary)"),
                      ("full", "first full install of v1")):
        L.append(f"\n## {title}\n")
        L.append("| tool | bytes on the wire | HTTP requests | wall (median) |")
        L.append("|---|---:|---:|---:|")
        for (t, name), rs in rows.items():
            if t != to:
                continue
            L.append(f"| {name} | {kib(med([r['bytes'] for r in rs]))} | "
                     f"{med([r['requests'] for r in rs]):.0f} | {med([r['wall'] for r in rs]):.2f} s |")
        if to in floors:
            L.append(f"| floor: {floors[to][1]} changed/added files, zstd -19 (--patch-from) | "
                     f"{kib(floors[to][0])} | – | – |")
        else:
            L.append(f"| `tar --zstd` (zstd -19) of the tree | {kib(tarz)} | – | – |")
        main_row = "imageupd (packs)" if to == "full" else "imageupd (delta)"
        ours = med([r["bytes"] for r in rows[(to, main_row)]])
        oreq = med([r["requests"] for r in rows[(to, main_row)]])
        rs = med([r["bytes"] for r in rows[(to, "rsync -az (daemon)")]])
        L.append("")
        L.append(f"Ratios of `{main_row}`:\n")
        r_rs = ours / rs
        L.append(f"- bytes / rsync -az = **{r_rs:.2f}** (target ≤ 0.8)" if r_rs >= 0.01
                 else f"- bytes / rsync -az = **{r_rs:.4f}** (target ≤ 0.8)")
        if to in floors:
            L.append(f"- bytes / floor = **{ours / floors[to][0]:.2f}** (target ≤ 1.1)")
            osr = med([r["requests"] for r in rows[(to, "OSTree pull (objects)")]])
            L.append(f"- requests / OSTree object pull = **{oreq / osr:.3f}** (target ≤ 0.1)")
            osd = med([r["bytes"] for r in rows[(to, "OSTree pull (static delta)")]])
            L.append(f"- bytes / OSTree static delta = **{ours / osd:.2f}**")
            L.append(f"- HTTP requests: **{oreq:.0f}** (OSTree object pull: {osr:.0f})"
                     + (" — one request is the minimum" if oreq <= 1 else ""))
            if floors[to][0] < 1024:
                L.append("- (the floor counts only the changed file's patch, not the manifest "
                         "change and signature a node also needs)")
            apply_rss = [r["rss_kib"] for r in rows[(to, main_row)] if "rss_kib" in r]
            if apply_rss:
                L.append(f"- peak RSS of `imageupd apply` through the delta: "
                         f"**{max(apply_rss) / 1024:.1f} MiB**")
        else:
            L.append(f"- bytes / tar --zstd -19 = **{ours / tarz:.2f}** (target ≤ 1.1)")
    L.append("\n## Publisher throughput (64 connections, wrk, loopback)\n")
    L.append("| what | server | MiB/s | requests/s | errors |")
    L.append("|---|---|---:|---:|---:|")
    for (name, server), r in tput.items():
        L.append(f"| v1 {name} | {server} | {r['mib_s']:.0f} | {r['req_s']:.0f} | {r['errors']} |")
    for name in ("loose objects", "packs"):
        a, b = tput[(name, "imageupd serve")], tput[(name, "nginx")]
        L.append(f"\n- {name}: imageupd serve / nginx = **{a['mib_s'] / b['mib_s']:.2f}** of throughput")
    L.append(f"- peak RSS of `imageupd serve` over all runs: **{rss / 1024:.1f} MiB**")
    RESULTS.write_text("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    if os.environ.get("BENCH_REPORT_ONLY"):
        report_only()
        sys.exit(0)
    try:
        main()
    finally:
        for p in procs:
            stop(p)
