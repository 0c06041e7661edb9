"""aclone benchmark: what every row uses (servers, status, the table).
See run for the rows and how to run them."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

# The rows' modules import nbd (libnbd's Python binding) after this.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PLUGIN = os.environ.get("ACLONE_PLUGIN", os.path.join(TOP, "build/plugin/aclone.so"))
CLI = os.environ.get("ACLONE_CLI", os.path.join(TOP, "build/src/aclone"))
MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40

rows = []
procs = []


def row(name, ours, peer, unit, target, met, cmd):
    rows.append((name, ours, peer, unit, target, met, cmd))
    print("  %-44s aclone %-12s peer %-12s %s" % (name, fmt(ours, unit), fmt(peer, unit),
                                                  "MET" if met else "NOT MET"),
          flush=True)


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return "%.3f s" % v
    if unit == "ms":
        return ("%.3f ms" if v < 1 else "%.2f ms") % v
    if unit == "MiB/s":
        return ("%.1f MiB/s" if v < 10 else "%.0f MiB/s") % v
    if unit == "MiB":
        return "%.1f MiB" % v
    return str(v)


def start(args, sock, pidfile, env=None, nice=0, timeout=30, idle=False):
    for p in (sock, pidfile):
        if os.path.exists(p):
            os.unlink(p)
    prefix = ["nice", "-n", str(nice)] if nice else []
    if idle:
        prefix = ["chrt", "--idle", "0"]
    log = open(pidfile + ".log", "w+")
    p = subprocess.Popen(prefix + ["nbdkit", "-f", "--exit-with-parent", "-U", sock,
                                   "-P", pidfile] + args, stdout=log, stderr=log,
                         env=env)
    procs.append(p)
    end = time.monotonic() + timeout
    while not os.path.exists(pidfile):
        if p.poll() is not None or time.monotonic() > end:
            log.seek(0)
            raise RuntimeError("nbdkit failed: %s\n%s" % (args, log.read()))
        time.sleep(0.002)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def uri(sock):
    return "nbd+unix:///?socket=" + sock


def status(meta):
    return json.loads(subprocess.run([CLI, "status", "--json", meta], capture_output=True,
                                     text=True, check=True).stdout)


def meta_complete(meta):
    """The header's complete flag (offset 44, bit 0)."""
    import struct
    try:
        with open(meta, "rb") as f:
            f.seek(44)
            return bool(struct.unpack("<I", f.read(4))[0] & 1)
    except (OSError, struct.error):
        return False


def wait_complete(meta, timeout=600):
    """Poll the header's complete flag directly: running the CLI 100 times
    a second would compete with what is measured."""
    end = time.monotonic() + timeout
    while True:
        if meta_complete(meta):
            return
        if time.monotonic() > end:
            raise RuntimeError("hydration did not complete")
        time.sleep(0.005)


def clone(tmp, name, source_uri, extra=()):
    sock = os.path.join(tmp, name + ".sock")
    dest = os.path.join(tmp, name + ".img")
    meta = os.path.join(tmp, name + ".meta")
    for p in (dest, meta):
        if os.path.exists(p):
            os.unlink(p)
    args = [PLUGIN, "dest=" + dest, "meta=" + meta] + list(extra) + \
        os.environ.get("ACLONE_BENCH_EXTRA", "").split()
    if source_uri:
        args.append("source=" + source_uri)
    p = start(args, sock, os.path.join(tmp, name + ".pid"))
    return p, sock, dest, meta


def random_file(path, size):
    rnd = random.Random(1)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(64 * MiB, left)
            f.write(rnd.randbytes(n))
            left -= n


def drop(path):
    if os.path.exists(path):
        os.unlink(path)


class QMP:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "return" in r or "error" in r:
                if "error" in r:
                    raise RuntimeError("QMP %s: %s" % (name, r["error"]))
                return r["return"]


def settle():
    """Let earlier runs' writeback finish so that no run pays for another."""
    subprocess.run(["sync"], check=True)
    time.sleep(0.5)


def run(cmd, timeout=120, **kw):
    return subprocess.run(cmd, check=True, timeout=timeout, **kw)


def read_latencies(h, span, seconds):
    """4 KiB reads at random offsets of [0, span) through h, one at a time,
    for `seconds`: their latencies in seconds, sorted."""
    rnd = random.Random(3)
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        off = rnd.randrange(0, span // 4096) * 4096
        t0 = time.perf_counter()
        h.pread(4096, off)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat
