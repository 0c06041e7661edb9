"""aclone benchmark, rows 1-6: hydration time, sparse, attach, read
throughput, p99 of hydrated reads, RSS."""
import os
import random
import shutil
import statistics
import subprocess
import time

from common import (CLI, GiB, MiB, QMP, TiB, clone, drop, procs, random_file,
                    read_latencies, row, settle, start, status, stop, uri, wait_complete)
import nbd  # noqa: E402  (common set the path)


# 1. Hydration time vs nbdcopy and vs qemu copy-on-read + block-stream ----



def qemu_stream(tmp, src_uri, size):
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        return None
    ov = os.path.join(tmp, "qemu-overlay.qcow2")
    drop(ov)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", src_uri,
                    ov, str(size)], check=True)
    qmp = os.path.join(tmp, "qmp.sock")
    exp = os.path.join(tmp, "qemu-export.sock")
    drop(qmp)
    t0 = time.monotonic()
    p = subprocess.Popen([qsd,
                          "--blockdev", "driver=file,node-name=ovf,filename=" + ov,
                          "--blockdev", "driver=qcow2,node-name=ov,file=ovf",
                          "--blockdev", "driver=copy-on-read,node-name=cor,file=ov",
                          "--nbd-server", "addr.type=unix,addr.path=" + exp,
                          "--export", "type=nbd,id=e,node-name=cor,writable=on",
                          "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qmp,
                          "--monitor", "chardev=m"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p)
    end = time.monotonic() + 30
    while not os.path.exists(qmp):
        if time.monotonic() > end or p.poll() is not None:
            return None
        time.sleep(0.005)
    m = QMP(qmp)
    m.cmd("block-stream", **{"job-id": "s", "device": "ov"})
    while any(j["device"] == "s" or j.get("type") == "stream"
              for j in m.cmd("query-block-jobs")):
        time.sleep(0.01)
    t = time.monotonic() - t0
    p.terminate()
    p.wait(20)
    drop(ov)
    return t




def random_image(tmp, size):
    src_img = os.path.join(tmp, "random.img")
    if not os.path.exists(src_img) or os.path.getsize(src_img) != size:
        random_file(src_img, size)
        settle()
    return src_img


def bench_hydration(tmp, size, rounds=3):
    src_img = random_image(tmp, size)
    ssock = os.path.join(tmp, "src.sock")
    src = start(["file", src_img], ssock, os.path.join(tmp, "src.pid"))
    # Warm the page cache for everyone alike.
    subprocess.run(["nbdcopy", uri(ssock), "null:"], check=True)

    t_nbdcopy, t_aclone, t_qemu = [], [], []
    for _ in range(rounds):             # alternate, best of each
        out = os.path.join(tmp, "nbdcopy.img")
        drop(out)
        settle()
        t0 = time.monotonic()
        subprocess.run(["nbdcopy", "--flush", uri(ssock), out], check=True)
        t_nbdcopy.append(time.monotonic() - t0)
        drop(out)

        drop(os.path.join(tmp, "hyd.img"))   # not inside the timing
        drop(os.path.join(tmp, "hyd.meta"))
        settle()
        t0 = time.monotonic()
        p, sock, dest, meta = clone(tmp, "hyd", uri(ssock))
        wait_complete(meta)
        t_aclone.append(time.monotonic() - t0)
        stop(p)

        settle()
        t = qemu_stream(tmp, uri(ssock), size)
        if t is not None:
            t_qemu.append(t)
    stop(src)
    t_nbdcopy, t_aclone = min(t_nbdcopy), min(t_aclone)
    t_qemu = min(t_qemu) if t_qemu else None
    n = "%d GiB random" % (size // GiB) if size >= GiB else "%d MiB random" % (size // MiB)
    row("1a. hydrate %s: time vs nbdcopy --flush" % n, t_aclone, t_nbdcopy, "s",
        "<= 1.1x", t_aclone <= 1.1 * t_nbdcopy,
        "nbdkit aclone ... (start to complete) | nbdcopy --flush SRC dest.img; best of %d" % rounds)
    row("1b. hydrate %s: time vs qemu COR+stream" % n, t_aclone, t_qemu, "s",
        "< 1x", t_qemu is not None and t_aclone < t_qemu,
        "qemu-storage-daemon qcow2 overlay (backing=SRC) + copy-on-read + block-stream")
    return src_img, dest


# 2. Sparse 64 GiB with 64 MiB of data ----------------------------------

def bench_sparse(tmp):
    img = os.path.join(tmp, "sparse.img")
    drop(img)
    rnd = random.Random(2)
    with open(img, "wb") as f:
        f.truncate(64 * GiB)
        for i in range(64):
            f.seek(i * GiB + rnd.randrange(0, GiB - MiB, 4096))
            f.write(rnd.randbytes(MiB))
    ssock = os.path.join(tmp, "sparse.sock")
    src = start(["file", img], ssock, os.path.join(tmp, "sparse.pid"))
    t0 = time.monotonic()
    p, sock, dest, meta = clone(tmp, "sparse-clone", uri(ssock))
    wait_complete(meta)
    t = time.monotonic() - t0
    st = status(meta)
    stop(p)
    stop(src)
    drop(img)
    drop(dest)
    row("2. 64 GiB sparse, 64 MiB data: time to complete", t, None, "s", "< 3 s", t < 3,
        "nbdkit file sparse.img | copied %d MiB, skipped %d MiB" %
        (st["bytes_copied"] // MiB, st["bytes_skipped"] // MiB))


# 3. Attach time, 1 TiB vs 1 GiB -----------------------------------------

def attach(tmp, size):
    ssock = os.path.join(tmp, "mem.sock")
    src = start(["memory", str(size)], ssock, os.path.join(tmp, "mem.pid"))
    times = []
    for i in range(3):
        t0 = time.monotonic()
        p, sock, dest, meta = clone(tmp, "att", uri(ssock))
        h = nbd.NBD()
        h.connect_unix(sock)
        h.pread(1, 0)
        times.append(time.monotonic() - t0)
        h.shutdown()
        stop(p)
        drop(dest)
        drop(meta)
    stop(src)
    return min(times)


def bench_attach(tmp):
    t_tb = attach(tmp, TiB)
    t_gb = attach(tmp, GiB)
    row("3. attach, start to first byte: 1 TiB vs 1 GiB", t_tb * 1000, t_gb * 1000, "ms",
        "< 100 ms, same", t_tb < 0.1 and t_tb < 1.5 * t_gb + 0.01,
        "nbdkit memory SIZE; nbdkit aclone; pread(1, 0); best of 3")


# 4. Read throughput ------------------------------------------------------

def read_rate(u, size):
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", u, "null:"], check=True)
    return size / MiB / (time.monotonic() - t0)


def best_alternating(a, b, rounds=5):
    """Run a() and b() alternately; best of each (noise only slows)."""
    ra, rb = [], []
    for _ in range(rounds):
        ra.append(a())
        rb.append(b())
    return max(ra), max(rb)


def bench_reads(tmp, src_img, size, parts="abc"):
    """parts: which of rows 4a, 4b, 4c to measure (--only 10 is 4b alone)."""
    ssock = os.path.join(tmp, "src.sock")
    src = start(["file", src_img], ssock, os.path.join(tmp, "src.pid"))
    if "a" in parts:
        # Hydrated clone vs nbdkit file on the same dest, served side by side.
        p, sock, dest, meta = clone(tmp, "rd", uri(ssock))
        wait_complete(meta)
        fsock = os.path.join(tmp, "f.sock")
        f = start(["file", dest], fsock, os.path.join(tmp, "f.pid"))
        read_rate(uri(sock), size)                     # warm
        ours, peer = best_alternating(lambda: read_rate(uri(sock), size),
                                      lambda: read_rate(uri(fsock), size))
        stop(p)
        stop(f)
        row("4a. read, hydrated clone vs nbdkit file", ours, peer, "MiB/s", ">= 0.9x",
            ours >= 0.9 * peer, "nbdcopy URI null:, alternating, best of 5")
        drop(dest)
        drop(meta)
    # Read misses, hydration off, vs nbdkit nbd proxying the same source.
    psock = os.path.join(tmp, "proxy.sock")
    px = start(["nbd", "socket=" + ssock], psock, os.path.join(tmp, "proxy.pid"))

    def miss(cor):
        p, sock, dest, meta = clone(tmp, "miss", uri(ssock),
                                    ["hydrate=false", "copy-on-read=" + cor])
        r = read_rate(uri(sock), size)
        stop(p)
        drop(dest)
        drop(meta)
        return r
    for cor, name in (("true", "4b. read misses (copy-on-read)"),
                      ("false", "4c. read misses (copy-on-read=false)")):
        if name[1] not in parts:
            continue
        ours, peer = best_alternating(lambda: miss(cor),
                                      lambda: read_rate(uri(psock), size))
        row(name + " vs nbdkit nbd", ours, peer, "MiB/s", ">= 0.9x",
            ours >= 0.9 * peer, "hydrate=false copy-on-read=%s; nbdcopy URI null:, "
            "alternating, best of 5" % cor)
    stop(px)
    stop(src)


# 5. p99 of 4 KiB random reads on hydrated regions ---------------------------

def p99(h, span, seconds):
    lat = read_latencies(h, span, seconds)
    print("    %d reads: p50 %.3f ms p90 %.3f ms p99 %.3f ms" % (
        len(lat), lat[len(lat) // 2] * 1000, lat[int(len(lat) * 0.9)] * 1000,
        lat[int(len(lat) * 0.99)] * 1000))
    return lat[int(len(lat) * 0.99)] * 1000


def bench_latency(tmp, src_img, size, rounds=3):
    ssock = os.path.join(tmp, "src.sock")
    # The source stands for a remote host: here it shares our two cores,
    # so it runs below the clone's client threads, as it would elsewhere.
    src = start(["file", src_img], ssock, os.path.join(tmp, "src.pid"), nice=10)
    paused, running, states = [], [], []
    for _ in range(rounds):
        settle()
        p, sock, dest, meta = clone(tmp, "lat", uri(ssock), ["hydrate=false"])
        h = nbd.NBD()
        h.connect_unix(sock)
        span = 256 * MiB
        for off in range(0, span, 32 * MiB):
            h.cache(32 * MiB, off)
        paused.append(p99(h, span, 1))
        subprocess.run([CLI, "resume", meta], check=True)
        time.sleep(0.2)
        running.append(p99(h, span, 1))
        states.append(status(meta)["state"])
        h.shutdown()
        stop(p)
        drop(dest)
        drop(meta)
        if src.poll() is not None:
            with open(os.path.join(tmp, "src.pid.log")) as f:
                raise RuntimeError("source died (%s): %s" % (src.returncode, f.read()))
    stop(src)
    running, paused = statistics.median(running), statistics.median(paused)
    row("5. 4K random read p99, hydrating vs paused", running, paused, "ms", "<= 2x",
        running <= 2 * paused, "python nbd pread(4096) on 256 MiB hydrated, 1 s each, "
        "median of %d rounds; source at nice 10; state after: %s" % (rounds, states))


# 6. Peak RSS, 1 TiB clone ------------------------------------------------------

def bench_rss(tmp):
    ssock = os.path.join(tmp, "sr.sock")
    src = start(["sparse-random", "size=1T", "percent=0.05", "runlength=65536", "seed=1"],
                ssock, os.path.join(tmp, "sr.pid"))
    p, sock, dest, meta = clone(tmp, "rss", uri(ssock))
    h = nbd.NBD()
    h.connect_unix(sock)
    rnd = random.Random(4)
    for _ in range(200):
        h.pread(65536, rnd.randrange(0, TiB // 65536) * 65536)
    end = time.monotonic() + 20
    while time.monotonic() < end and status(meta)["state"] != "complete":
        time.sleep(0.2)
    with open("/proc/%d/status" % p.pid) as f:
        hwm = [l for l in f if l.startswith("VmHWM")][0].split()[1]
    st = status(meta)
    h.shutdown()
    stop(p)
    stop(src)
    drop(dest)
    rss = int(hwm) / 1024
    row("6. peak RSS serving a 1 TiB clone (64K regions)", rss, None, "MiB", "< 64 MiB",
        rss < 64, "VmHWM after 200 random reads and %.1f%% hydration (%s)" %
        (st["percent"], st["state"]))
