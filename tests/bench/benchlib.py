"""Helpers shared by the benchmark drivers (net_bench.py, fleet_bench.py):
running commands with their stderr in the error, and loopback ports."""

import socket
import subprocess
import time


def run(cmd, **kw):
    """Run a command; on failure raise with its stderr."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return r.stdout


def free_port():
    """A loopback TCP port free right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, proc, what, timeout_s=30):
    """Wait until something listens on `port`; fail if `proc` exits first."""
    t0 = time.time()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"{what} exited ({proc.returncode})")
            if time.time() - t0 > timeout_s:
                raise SystemExit(f"{what} did not listen on {port}")
            time.sleep(0.05)
