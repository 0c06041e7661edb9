"""aclone benchmark, rows 7-9 (issue 11, foreground first): a file tree
read over a shared link, link fill, local contention."""
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from common import (CLI, GiB, MiB, QMP, clone, drop, procs, random_file, read_latencies,
                    row, run, settle, start, status, stop, uri)
import nbd  # noqa: E402  (common set the path)


# Issue 11: the foreground first ------------------------------------------------
#
# The "link" is a source behind nbdkit's rate and delay filters.  The rate
# filter counts bits and its suffixes are binary (nbdkit_parse_size):
# rate=200M is 200 * 2^20 bit/s = 25 MiB/s.  Its bucket holds 2 s of
# traffic (burstiness) and starts full, so the first ~50 MiB would pass at
# once: link_source() drains it before anyone else connects.

LINK_RATE = "200M"
LINK_MIBS = 200 / 8                     # MiB/s


def link_source(tmp, img, name="link"):
    sock = os.path.join(tmp, name + ".sock")
    p = start(["--filter=rate", "--filter=delay", "file", img, "rate=" + LINK_RATE,
               "delay-read=1ms"], sock, os.path.join(tmp, name + ".pid"))
    h = nbd.NBD()
    h.connect_unix(sock)
    n = min(h.get_size(), int(2.2 * LINK_MIBS) * MiB)
    for off in range(0, n - 4 * MiB + 1, 4 * MiB):
        h.pread(4 * MiB, off)
    h.shutdown()
    return p, sock


def warm_file(path):
    """Read PATH into the page cache: the link, not the disk, limits the source."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass




def disk_usage(path):
    return int(subprocess.run(["du", "-s", "-B1", path], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def count_files(path):
    return sum(len(d) + len(f) for _, d, f in os.walk(path))


# 7. A file tree read over a shared link, clone mounted at once ----------------

def build_fs_image(tmp, target):
    """An ext4 image (mke2fs -d) of a tree of >= target bytes of system files,
    holding one ~100 MB subtree to read.  Returns (image, subtree, its size)."""
    tree = os.path.join(tmp, "tree")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    sub = None
    for cand in ("/usr/share/man", "/usr/share/doc", "/usr/share/locale"):
        if os.path.isdir(cand) and 50 * MiB <= disk_usage(cand) <= 200 * MiB:
            sub = cand
            break
    if sub is None:
        raise RuntimeError("no directory of 50..200 MiB among /usr/share/{man,doc,locale}")
    run(["cp", "-a", sub, os.path.join(tree, "sub")])
    sub_bytes = disk_usage(os.path.join(tree, "sub"))
    sub_files = count_files(os.path.join(tree, "sub"))
    total = sub_bytes
    for rnd in range(20):               # copy /usr/share, /usr/lib again until big enough
        for top in ("/usr/share", "/usr/lib"):
            for e in sorted(os.listdir(top)):
                path = os.path.join(top, e)
                if total >= target:
                    break
                if path == sub or os.path.islink(path) or not os.path.isdir(path):
                    continue
                n = disk_usage(path)
                if total + n > target + target // 4:
                    continue            # keep near the target
                run(["cp", "-a", path, os.path.join(tree, "%d-%s-%s" % (
                    rnd, os.path.basename(top), e))], timeout=600)
                total += n
        if total >= target:
            break
    files = count_files(tree)
    img = os.path.join(tmp, "fsimage.img")
    drop(img)
    mib = (total + total // 4) // MiB + 128
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-N", str(files + files // 4 + 10000),
         "-d", tree, img, "%dM" % mib], timeout=1200, stdout=subprocess.DEVNULL)
    shutil.rmtree(tree, ignore_errors=True)
    print("    ext4 image: %d MiB of files (%d entries), image %d MiB (%d MiB allocated); "
          "subtree %s: %d MiB (%d entries)" % (total // MiB, files, mib, disk_usage(img) // MiB,
                                             sub, sub_bytes // MiB, sub_files), flush=True)
    return img, "sub", sub_bytes, sub_files


@contextlib.contextmanager
def fs_mounted(tmp, export_uri):
    """nbdfuse EXPORT, losetup -r, mount -o ro,noload; undone in any case."""
    fdir, mnt = os.path.join(tmp, "fuse"), os.path.join(tmp, "mnt")
    os.makedirs(fdir, exist_ok=True)
    os.makedirs(mnt, exist_ok=True)
    pid = os.path.join(tmp, "nbdfuse.pid")
    drop(pid)
    log = open(pid + ".log", "w+")
    fp = subprocess.Popen(["nbdfuse", "-r", "-P", pid, fdir, export_uri],
                          stdout=log, stderr=log)
    procs.append(fp)
    loop, mounted = None, False
    try:
        end = time.monotonic() + 30
        while not os.path.exists(pid):
            if fp.poll() is not None or time.monotonic() > end:
                log.seek(0)
                raise RuntimeError("nbdfuse failed: %s" % log.read())
            time.sleep(0.005)
        loop = run(["losetup", "-r", "-f", "--show", os.path.join(fdir, "nbd")],
                   capture_output=True, text=True).stdout.strip()
        run(["mount", "-t", "ext4", "-o", "ro,noload", loop, mnt])
        mounted = True
        yield mnt
    finally:
        if mounted and subprocess.run(["umount", mnt], timeout=120).returncode:
            subprocess.run(["umount", "-l", mnt], timeout=60)
        if loop:
            subprocess.run(["losetup", "-d", loop], timeout=60)
        end = time.monotonic() + 20
        while os.path.ismount(fdir):
            if subprocess.run(["fusermount3", "-u", fdir], timeout=60,
                              stderr=subprocess.DEVNULL).returncode == 0:
                break
            if time.monotonic() > end:
                subprocess.run(["fusermount3", "-u", "-z", fdir], timeout=60)
                break
            time.sleep(0.1)             # the loop device lets go of the file
        try:
            fp.wait(20)
        except subprocess.TimeoutExpired:
            fp.kill()
            fp.wait()


def qemu_cor_export(tmp, src_uri, size):
    """qemu-storage-daemon: qcow2 overlay (backing = SRC) under a copy-on-read
    filter, exported over NBD, block-stream started.  (p, uri, qmp, overlay)."""
    qsd = shutil.which("qemu-storage-daemon")
    if not qsd:
        return None
    ov = os.path.join(tmp, "cor-overlay.qcow2")
    drop(ov)
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", src_uri, ov, str(size)])
    qmp, exp = os.path.join(tmp, "cor-qmp.sock"), os.path.join(tmp, "cor-export.sock")
    drop(qmp)
    drop(exp)
    log = open(os.path.join(tmp, "qsd.log"), "w+")
    p = subprocess.Popen([qsd,
                          "--blockdev", "driver=file,node-name=ovf,filename=" + ov,
                          "--blockdev", "driver=qcow2,node-name=ov,file=ovf",
                          "--blockdev", "driver=copy-on-read,node-name=cor,file=ov",
                          "--nbd-server", "addr.type=unix,addr.path=" + exp,
                          "--export", "type=nbd,id=e,node-name=cor,name=cor,writable=on",
                          "--chardev", "socket,id=m,path=%s,server=on,wait=off" % qmp,
                          "--monitor", "chardev=m"], stdout=log, stderr=log)
    procs.append(p)
    end = time.monotonic() + 30
    while not (os.path.exists(qmp) and os.path.exists(exp)):
        if time.monotonic() > end or p.poll() is not None:
            log.seek(0)
            raise RuntimeError("qemu-storage-daemon failed: %s" % log.read())
        time.sleep(0.005)
    m = QMP(qmp)
    m.cmd("block-stream", **{"job-id": "s", "device": "ov"})
    return p, "nbd+unix:///cor?socket=" + exp, m, ov


def read_tree(mnt, sub):
    # tar to a pipe: GNU tar skips reading files when it writes to /dev/null.
    run(["bash", "-c", 'set -o pipefail; tar -C "$1" -cf - "$2" | cat > /dev/null', "_",
         mnt, sub], timeout=1200)


def fs_read(tmp, img, sub, how):
    """Start a clone (or qemu) of IMG behind the link, mount it at once,
    read SUB; returns (seconds for the read, note)."""
    settle()
    warm_file(img)
    src, ssock = link_source(tmp, img)
    p = q = None
    dest = os.path.join(tmp, "fsclone.img")
    meta = os.path.join(tmp, "fsclone.meta")
    try:
        if how == "qemu":
            q = qemu_cor_export(tmp, uri(ssock), os.path.getsize(img))
            if q is None:
                return None, "no qemu-storage-daemon"
            p, export_uri = q[0], q[1]
        else:
            p, sock, dest, meta = clone(tmp, "fsclone", uri(ssock),
                                        ["hydrate=false"] if how == "off" else [])
            export_uri = uri(sock)
        t0 = time.monotonic()
        with fs_mounted(tmp, export_uri) as mnt:
            t1 = time.monotonic()
            read_tree(mnt, sub)
            t = time.monotonic() - t1
        if how == "qemu":
            jobs = q[2].cmd("query-block-jobs")
            note = ("stream %.0f%%" % (100 * jobs[0]["offset"] / jobs[0]["len"])
                    if jobs else "stream done")
        else:
            st = status(meta)
            note = "%s %.0f%%" % (st["state"], st["percent"])
        print("    %-9s read %.2f s (mount %.2f s), after: %s%s" % (
            how, t, t1 - t0, note, "" if how == "qemu" else status_extra(st)), flush=True)
        return t, note
    finally:
        if p is not None:
            stop(p)
        if q is not None:
            drop(q[3])
        drop(dest)
        drop(meta)
        stop(src)


def bench_shared_link(tmp, quick):
    if os.geteuid() != 0:
        print("  7. skipped: needs root (losetup, mount)")
        return
    for tool in ("nbdfuse", "fusermount3", "mke2fs", "losetup"):
        if not shutil.which(tool):
            print("  7. skipped: no %s" % tool)
            return
    rounds = 2 if quick else 3
    target = 300 * MiB if quick else GiB
    fsimg, sub, sub_bytes, sub_files = build_fs_image(tmp, target)
    img_mib = os.path.getsize(fsimg) // MiB
    res = {"hydrating": [], "off": [], "qemu": []}
    notes = []
    for _ in range(rounds):
        for how in res:
            t, note = fs_read(tmp, fsimg, sub, how)
            if t is not None:
                res[how].append(t)
            if how == "hydrating":
                notes.append(note)
    drop(fsimg)
    med = {k: statistics.median(v) if v else None for k, v in res.items()}
    what = "read %d MiB, %d entries" % (sub_bytes // MiB, sub_files)
    link = "source nbdkit file --filter=rate rate=%s --filter=delay delay-read=1ms" % LINK_RATE
    row("7a. shared link, %s: hydrating vs off" % what, med["hydrating"], med["off"], "s",
        "<= 1.15x", med["hydrating"] <= 1.15 * med["off"],
        "%s; ext4 (mke2fs -d) of %d MiB, mounted via nbdfuse + losetup -r + mount ro,noload "
        "at once; tar of the subtree; hydrate=false as peer; median of %d; hydrating clone "
        "after the read: %s" % (link, img_mib, rounds, notes))
    row("7b. shared link, %s: aclone vs qemu COR+stream" % what, med["hydrating"],
        med["qemu"], "s", "<= 0.6x",
        med["qemu"] is not None and med["hydrating"] <= 0.6 * med["qemu"],
        "same; peer: qemu-storage-daemon qcow2 overlay (backing=SRC) + copy-on-read "
        "filter, NBD export, block-stream started at once; median of %d" % rounds)


# 8. Link fill: hydration vs the link, idle and with a busy client ----------------

CLIENT = r"""
import nbd, random, sys, time
h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
rnd = random.Random(5)
end = time.monotonic() + float(sys.argv[2])
n = reads = 0
t0 = time.monotonic()
while time.monotonic() < end:
    l = rnd.randrange(1, 17) * 4096
    h.pread(l, rnd.randrange(0, (size - l) // 4096) * 4096)
    n += l
    reads += 1
print(n, reads, time.monotonic() - t0)
h.shutdown()
"""


def busy_client(sock, seconds):
    """A client reading random 4K..64K blocks all the time (its own process)."""
    p = subprocess.Popen([sys.executable, "-c", CLIENT, uri(sock), str(seconds)],
                         stdout=subprocess.PIPE, text=True)
    procs.append(p)
    return p


def status_extra(st):
    """What aclone status tells beyond the fields this script knows (e.g.
    what limits hydration), to print next to a measurement."""
    base = {"size", "block_size", "regions", "hydrated", "percent", "bytes_copied",
            "bytes_skipped", "in_flight", "state", "pid", "rate", "eta_seconds", "updated",
            "errors", "last_error", "source"}
    extra = {k: v for k, v in st.items() if k not in base}
    return "; status: " + json.dumps(extra) if extra else ""


def copy_rate(meta, seconds):
    """Bytes copied per second over SECONDS, timed by the server's own
    updates of the live page (it writes them about once a second)."""
    s1 = status(meta)
    time.sleep(seconds)
    s2 = status(meta)
    dt = s2["updated"] - s1["updated"]
    if dt <= 0:
        dt = seconds
    return (s2["bytes_copied"] - s1["bytes_copied"]) / dt / MiB, s2


def bench_link_fill(tmp, quick):
    img = os.path.join(tmp, "link.img")
    if not os.path.exists(img):
        random_file(img, GiB)
        settle()
    warm, window = 3, (8 if quick else 15)

    def one(client):
        settle()
        warm_file(img)
        src, ssock = link_source(tmp, img)
        cl = None
        try:
            # With a client: copy-on-read=false, so that bytes copied are
            # hydration's alone, not the client's misses.
            p, sock, dest, meta = clone(tmp, "fill", uri(ssock),
                                        ["copy-on-read=false"] if client else [])
            if client:
                cl = busy_client(sock, warm + window + 1)
            time.sleep(warm)            # past the rate filter's 2 s burst
            rate, st = copy_rate(meta, window)
            info = "state %s %.0f%%" % (st["state"], st["percent"])
            if cl is not None:
                out, _ = cl.communicate(timeout=window + 30)
                n, reads, dt = out.split()
                info += "; client %.1f MiB/s, %d reads" % (int(n) / float(dt) / MiB,
                                                           int(reads))
            print("    %s: hydration %.1f MiB/s; %s%s" % (
                "busy client" if client else "no client", rate, info, status_extra(st)),
                flush=True)
            stop(p)
            drop(dest)
            drop(meta)
            return rate, info
        finally:
            if cl is not None and cl.poll() is None:
                cl.kill()
                cl.wait()
            stop(src)

    idle, idle_info = one(False)
    busy, busy_info = one(True)
    drop(img)
    link = "1 GiB random, nbdkit file --filter=rate rate=%s (%.0f MiB/s) " \
           "--filter=delay delay-read=1ms" % (LINK_RATE, LINK_MIBS)
    row("8a. link fill, no client: hydration vs link", idle, LINK_MIBS, "MiB/s", ">= 0.9x",
        idle >= 0.9 * LINK_MIBS, "%s; bytes_copied over %d s after %d s (aclone status "
        "--json, timed by its 'updated'); %s" % (link, window, warm, idle_info))
    row("8b. link fill, busy client: hydration vs link", busy, LINK_MIBS, "MiB/s", ">= 0.1x",
        busy >= 0.1 * LINK_MIBS, "same, copy-on-read=false, while one client (python nbd, "
        "QD1) reads random 4K..64K blocks all the time; %s" % busy_info)


# 9. Local contention: p50/p99/p99.9 of hydrated reads, hydrating vs paused -------

def lat_pcts(h, span, seconds):
    lat = read_latencies(h, span, seconds)
    return [lat[min(len(lat) - 1, int(len(lat) * q))] * 1000 for q in (0.5, 0.99, 0.999)]


def fio_pcts(sock, span, seconds):
    out = run(["fio", "--name=r", "--ioengine=nbd", "--uri=" + uri(sock), "--rw=randread",
               "--bs=4k", "--iodepth=1", "--size=%d" % span, "--runtime=%d" % seconds,
               "--time_based", "--output-format=json", "--percentile_list=50:99:99.9"],
              timeout=seconds + 60, capture_output=True, text=True).stdout
    rd = json.loads(out[out.index("{"):])["jobs"][0]["read"]   # after "connected to..."
    pc = rd["clat_ns"]["percentile"]
    return [pc[k] / 1e6 for k in ("50.000000", "99.000000", "99.900000")]


def bench_contention(tmp, quick):
    have_fio = shutil.which("fio") is not None
    rounds, secs_py, secs_fio = (2, 1, 3) if quick else (3, 2, 5)
    ssock = os.path.join(tmp, "pat.sock")
    # A source the hydrator cannot finish while we measure (32 GiB, no zeros,
    # no file).  It stands for another host, whose CPU is not ours: at
    # SCHED_IDLE (BENCH_SOURCE_NICE=1: at nice 10 instead, as in 5), so
    # that what is measured is the clone's own contention.
    if os.environ.get("BENCH_SOURCE_NICE"):
        src = start(["pattern", "size=32G"], ssock, os.path.join(tmp, "pat.pid"), nice=10)
    else:
        src = start(["pattern", "size=32G"], ssock, os.path.join(tmp, "pat.pid"), idle=True)
    span = 256 * MiB
    res = {k: [] for k in ("py-paused", "py-hyd", "fio-paused", "fio-hyd")}
    states = []
    try:
        for _ in range(rounds):
            settle()
            p, sock, dest, meta = clone(tmp, "cont", uri(ssock), ["hydrate=false"])
            h = nbd.NBD()
            h.connect_unix(sock)
            for off in range(0, span, 32 * MiB):
                h.cache(32 * MiB, off)
            h.flush()
            res["py-paused"].append(lat_pcts(h, span, secs_py))
            if have_fio:
                res["fio-paused"].append(fio_pcts(sock, span, secs_fio))
            b0 = status(meta)["bytes_copied"]
            run([CLI, "resume", meta])
            end = time.monotonic() + 10
            while True:                 # until the server has taken the resume
                st = status(meta)
                if st["state"] == "hydrating" and st["bytes_copied"] > b0:
                    break
                if time.monotonic() > end:
                    raise RuntimeError("hydration did not resume: %s" % st)
                time.sleep(0.05)
            # The pace controller (fgpace.h) learns from these reads what
            # the copy costs them: a few probes, about 4 s.  What it costs
            # until then is printed, not rated.
            warm = lat_pcts(h, span, 4)
            print("    first 4 s  p50 %.3f ms p99 %.3f ms p99.9 %.3f ms" % tuple(warm))
            res["py-hyd"].append(lat_pcts(h, span, secs_py))
            if have_fio:
                res["fio-hyd"].append(fio_pcts(sock, span, secs_fio))
            st = status(meta)
            states.append("%s %.0f%%" % (st["state"], st["percent"]))
            fg = st.get("foreground", {})
            print("    pace %.0f MB/s after %d probes, %d cuts" % (
                fg.get("pace", 0) / 1e6, fg.get("pace_probes", 0), fg.get("pace_cuts", 0)))
            for k, v in res.items():
                if v:
                    print("    %-10s p50 %.3f ms p99 %.3f ms p99.9 %.3f ms" % (k, *v[-1]))
            print("    after: %s%s" % (states[-1], status_extra(st)), flush=True)
            h.shutdown()
            stop(p)
            drop(dest)
            drop(meta)
    finally:
        stop(src)
    note = "256 MiB hydrated (NBD_CMD_CACHE + flush) of a 32 GiB clone of nbdkit pattern " \
           "(%s); paused = hydrate=false, then aclone resume and 4 s of reads for the " \
           "pace to settle; median of %d rounds; " \
           "clone after: %s" % ("nice 10" if os.environ.get("BENCH_SOURCE_NICE")
                                else "SCHED_IDLE", rounds, states)
    for tool, secs, how in (("py", secs_py, "python nbd pread(4096) QD1"),
                            ("fio", secs_fio, "fio --ioengine=nbd --rw=randread --bs=4k "
                             "--iodepth=1 --size=256M (clat)")):
        if not res[tool + "-hyd"]:
            print("  9. %s skipped: no fio" % tool)
            continue
        for i, (q, lim, key) in enumerate((("p50", 1.2, "a"), ("p99", 2, "b"),
                                           ("p99.9", 3, "c"))):
            ours = statistics.median(r[i] for r in res[tool + "-hyd"])
            peer = statistics.median(r[i] for r in res[tool + "-paused"])
            row("9%s. 4K randread %s %s, hydrating vs paused" % (
                key if tool == "py" else chr(ord(key) + 3), tool, q), ours, peer, "ms",
                "<= %gx" % lim, ours <= lim * peer,
                "%s, %d s each; %s" % (how, secs, note) if i == 0 else "same")
