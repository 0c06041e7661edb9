"""aclone benchmark, rows 12-13 (issue 13, fleet scale): memory at
15 TiB and 1 TiB, attach to first byte, many clones at once."""
import json
import os
import signal
import statistics
import subprocess
import time

from common import (CLI, MiB, PLUGIN, TiB, clone, drop, procs, random_file,
                    row, run, settle, start, status, stop, uri)
import nbd  # noqa: E402  (common set the path)


# Issue 13: fleet scale --------------------------------------------------------
#
# 12. Memory at 15 TiB (a, b: empty; c: hydrating) and 1 TiB (d), 64 KiB
# regions; 12e attach to first byte at 15 TiB (--only 14: 12e alone);
# 13. many clones of one source export.

def proc_mem(pid):
    """VmHWM, VmRSS, RssAnon, RssFile of PID, in KiB."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k = line.split(":")[0]
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(line.split()[1])
    return out


class MemSampler:
    """Samples RssAnon and RssFile of PID every 50 ms in a thread and keeps
    their maxima: the kernel keeps a high-water mark (VmHWM) of the sum only."""

    def __init__(self, pid, interval=0.05):
        import threading
        self.pid, self.interval = pid, interval
        self.max = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
        self.samples = 0
        self.done = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.done.is_set():
            self.sample()
            self.done.wait(self.interval)

    def sample(self):
        try:
            m = proc_mem(self.pid)
        except (OSError, KeyError):
            return None
        for k in self.max:
            self.max[k] = max(self.max[k], m.get(k, 0))
        self.samples += 1
        return m

    def stop(self):
        """Stop sampling; returns the final proc_mem (VmHWM is exact)."""
        self.done.set()
        self.t.join()
        return self.sample()


def mib(kib):
    return kib / 1024


def mem_note(hwm, smp):
    return "VmHWM %.1f MiB; sampled maxima (50 ms, %d samples) RssAnon %.1f MiB, " \
           "RssFile %.1f MiB" % (mib(hwm), smp.samples, mib(smp.max["RssAnon"]),
                                 mib(smp.max["RssFile"]))


def baseline_rss(tmp):
    """VmHWM (KiB) of a plain nbdkit null size=1T with a client that has read
    4 KiB, and of nbdkit nbd (nbdkit + libnbd) proxying it."""
    nsock = os.path.join(tmp, "null.sock")
    null = start(["null", "size=1T"], nsock, os.path.join(tmp, "null.pid"))
    psock = os.path.join(tmp, "nullproxy.sock")
    px = start(["nbd", "socket=" + nsock], psock, os.path.join(tmp, "nullproxy.pid"))
    out = []
    try:
        for p, sock in ((null, nsock), (px, psock)):
            h = nbd.NBD()
            h.connect_unix(sock)
            h.pread(4096, TiB - 4096)
            out.append(proc_mem(p.pid)["VmHWM"])
            h.shutdown()
    finally:
        stop(px)
        stop(null)
    return out


def clone_memory(tmp, name, source_uri, seconds):
    """Clone SOURCE_URI, sample its memory until complete or SECONDS have
    passed; returns (mem at the end, sampler, status, seconds run,
    mem after completion or None)."""
    t0 = time.monotonic()
    p, sock, dest, meta = clone(tmp, name, source_uri)
    smp = MemSampler(p.pid)
    try:
        end = t0 + seconds
        complete = False
        while time.monotonic() < end:
            st = status(meta)
            if st["state"] == "complete":
                complete = True
                break
            if st["state"] in ("failed", "error"):
                raise RuntimeError("clone %s: %s" % (name, st))
            time.sleep(0.1)
        t = time.monotonic() - t0
        m = smp.stop()
        after = None
        if complete:
            time.sleep(1)               # the server lets go of its map
            after = proc_mem(p.pid)
        st = status(meta)
        return m, smp, st, t, after
    finally:
        smp.stop()
        stop(p)
        drop(dest)
        drop(meta)


def start_to_read(tmp, name, args, off):
    """Seconds from starting nbdkit ARGS to the end of a 4 KiB read at OFF."""
    sock = os.path.join(tmp, name + ".sock")
    t0 = time.monotonic()
    p = start(args, sock, os.path.join(tmp, name + ".pid"))
    h = nbd.NBD()
    h.connect_unix(sock)
    data = h.pread(4096, off)
    t = time.monotonic() - t0
    h.shutdown()
    stop(p)
    if data != bytes(4096):
        raise RuntimeError("%s: wrong data at %d" % (name, off))
    return t


def bench_attach_15t(tmp, img, ssock, rounds):
    """12e (--only 14 alone). Start to the first 4 KiB read at 15 TiB:
    clone vs nbdkit file."""
    size = os.path.getsize(img)
    off = size - 4096                   # the far end of the map
    ours, peer = [], []
    for _ in range(rounds):             # alternating
        dest, meta = os.path.join(tmp, "att15.img"), os.path.join(tmp, "att15.meta")
        drop(dest)
        drop(meta)
        ours.append(start_to_read(tmp, "att15", [PLUGIN, "dest=" + dest, "meta=" + meta,
                                                 "source=" + uri(ssock)], off))
        drop(dest)
        drop(meta)
        peer.append(start_to_read(tmp, "f15", ["file", img], off))
    print("    start to first 4K read at 15 TiB: aclone %s ms; nbdkit file %s ms" % (
        " ".join("%.1f" % (t * 1000) for t in ours),
        " ".join("%.1f" % (t * 1000) for t in peer)), flush=True)
    o, q = statistics.median(ours) * 1000, statistics.median(peer) * 1000
    row("12e. attach to first 4K read, 15 TiB: vs nbdkit file", o, q, "ms", "<= 100 ms",
        o <= 100, "truncate -s 15T; source nbdkit file; Popen(nbdkit -f -U SOCK -P PID "
        "aclone ...) until -P's file exists, connect, pread(4096, 15T-4K) (a miss: from the "
        "source), new dest and meta each time; peer: the same with nbdkit file 15T.img; "
        "median of %d alternating (best %.1f vs %.1f ms)" % (rounds, min(ours) * 1000,
                                                            min(peer) * 1000))


def bench_memory_15t(tmp, quick, parts="abcd"):
    """Rows 12a-12e; PARTS: a empty 15 TiB (12a, 12b), b hydrating 15 TiB
    (12c), c hydrating 1 TiB (12d), d attach at 15 TiB (12e)."""
    secs = 20 if quick else 30
    img = os.path.join(tmp, "empty15t.img")
    ssock = os.path.join(tmp, "e15.sock")
    src = None
    try:
        if "a" in parts or "d" in parts:
            run(["truncate", "-s", "15T", img])
            src = start(["file", img], ssock, os.path.join(tmp, "e15.pid"))
        if "a" in parts:
            m, smp, st, t, after = clone_memory(tmp, "m15e", uri(ssock), 120)
            if after is None:
                raise RuntimeError("a 15 TiB empty clone did not complete: %s" % st)
            regions = st["regions"]
            row("12a. 15 TiB empty (64K regions): peak RSS", mib(m["VmHWM"]), None,
                "MiB", "<= 80 MiB", m["VmHWM"] <= 80 * 1024,
                "truncate -s 15T; nbdkit file; nbdkit aclone (%d regions), complete in "
                "%.2f s; %s" % (regions, t, mem_note(m["VmHWM"], smp)))
            map_kib = regions // 8 // 1024
            row("12b. 15 TiB empty: RSS once complete", mib(after["VmRSS"]),
                mib(m["VmHWM"]), "MiB", "map freed: anon < %d MiB" % (map_kib // 2048),
                after["RssAnon"] < map_kib // 2,
                "VmRSS 1 s after complete (peer column: its VmHWM); RssAnon %.1f MiB, "
                "RssFile %.1f MiB; the hydrated map alone is %.1f MiB of bits" % (
                    mib(after["RssAnon"]), mib(after["RssFile"]), mib(map_kib)))
        if "b" in parts or "c" in parts:
            base_null, base_proxy = baseline_rss(tmp)
            print("    baseline VmHWM: nbdkit null size=1T %.1f MiB, nbdkit nbd (libnbd) "
                  "proxying it %.1f MiB" % (mib(base_null), mib(base_proxy)), flush=True)
        for key, size, pct, target in (("b", "15T", "0.001", 80), ("c", "1T", "0.01", 16)):
            if key not in parts:
                continue
            rsock = os.path.join(tmp, "sr%s.sock" % size)
            args = ["sparse-random", "size=" + size, "percent=" + pct, "runlength=1048576",
                    "seed=1"]
            t0 = time.monotonic()
            # It builds its map of 4K blocks first: ~25 s and 500 MiB at 15 TiB.
            rsrc = start(args, rsock, os.path.join(tmp, "sr%s.pid" % size), timeout=300)
            tsrc = time.monotonic() - t0
            try:
                m, smp, st, t, after = clone_memory(tmp, "m" + size, uri(rsock), secs)
            finally:
                stop(rsrc)
            hwm = m["VmHWM"]
            ok = hwm <= target * 1024 if key == "b" else hwm < target * 1024
            row("12%s. %s hydrating (64K regions): peak RSS" % (
                "c" if key == "b" else "d", "15 TiB" if key == "b" else "1 TiB"),
                mib(hwm), mib(base_null), "MiB",
                ("<= %d MiB" if key == "b" else "< %d MiB") % target, ok,
                "nbdkit %s (source up in %.0f s); %s for %.1f s: %s %.3f%% hydrated, "
                "copied %.1f MiB, skipped %.2f TiB; %s%s; peer: nbdkit null size=1T with "
                "a client (nbdkit nbd proxying it, libnbd: %.1f MiB)" % (
                    " ".join(args), tsrc, "until complete" if after else "sampled",
                    t, st["state"], st["percent"], st["bytes_copied"] / MiB,
                    st["bytes_skipped"] / TiB, mem_note(hwm, smp),
                    "; once complete VmRSS %.1f MiB (RssAnon %.1f)" % (
                        mib(after["VmRSS"]), mib(after["RssAnon"])) if after else "",
                    mib(base_proxy)))
        if "d" in parts:
            bench_attach_15t(tmp, img, ssock, 3 if quick else 5)
    finally:
        if src is not None:
            stop(src)
        drop(img)


# 13. Many clones of one source export, started together ------------------------

def sha256_range(path, off, length):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(off)
        while length:
            b = f.read(min(8 * MiB, length))
            if not b:
                break
            h.update(b)
            length -= len(b)
    return h.hexdigest()


def poll_finish(ps, t0):
    """Wait for processes PS (started at t0); returns (finish times, peak RSS
    KiB from wait4's rusage)."""
    done, rss = {}, {}
    while len(done) < len(ps):
        for i, p in enumerate(ps):
            if i in done:
                continue
            pid, st, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                done[i] = time.monotonic() - t0
                rss[i] = ru.ru_maxrss
                p.returncode = os.waitstatus_to_exitcode(st)
                if p.returncode:
                    raise RuntimeError("nbdcopy %d failed: %d" % (i, p.returncode))
        time.sleep(0.01)
    return [done[i] for i in range(len(ps))], [rss[i] for i in range(len(ps))]


def many_clones_round(tmp, n, slice_size, socks, src_img, sums, extra=(), poll_every=15):
    """n nbdkit aclone processes at once, each cloning its slice (extra:
    more plugin parameters); returns (finish times, VmHWM KiB each)."""
    names = ["mc%02d" % i for i in range(n)]
    metas = [os.path.join(tmp, x + ".meta") for x in names]
    dests = [os.path.join(tmp, x + ".img") for x in names]
    for x in metas + dests:
        drop(x)
    ps = []
    settle()
    t0 = time.monotonic()
    for i, x in enumerate(names):
        pid, sock = os.path.join(tmp, x + ".pid"), os.path.join(tmp, x + ".sock")
        drop(pid)
        drop(sock)
        log = open(pid + ".log", "w+")
        p = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-U", sock, "-P", pid,
                              PLUGIN, "dest=" + dests[i], "meta=" + metas[i],
                              "source=" + uri(socks[i])] + list(extra),
                             stdout=log, stderr=log)
        procs.append(p)
        ps.append(p)
    done = {}
    polls, poll_s, last_poll = 0, 0.0, time.monotonic()
    fds = {}
    try:
        end = t0 + 600
        while len(done) < n:
            # Each clone's completion: the header's complete flag (as
            # wait_complete), read every 50 ms through a descriptor kept
            # open (opening 64 files every 10 ms took a tenth of a core,
            # which the nbdcopy rounds do not pay).  aclone status --json
            # META... (0.2-0.9 s for 64 META here, on a loaded machine)
            # every poll_every seconds, a monitor's cadence, for failures,
            # and at the end.
            for i, meta in enumerate(metas):
                if i in done:
                    continue
                if i not in fds:
                    try:
                        fds[i] = os.open(meta, os.O_RDONLY)
                    except OSError:
                        continue
                if len(os.pread(fds[i], 4, 44)) == 4 and os.pread(fds[i], 4, 44)[0] & 1:
                    done[i] = time.monotonic() - t0
            if time.monotonic() - last_poll >= poll_every or len(done) == n:
                last_poll = time.monotonic()
                out = subprocess.run([CLI, "status", "--json"] + metas, capture_output=True,
                                     text=True).stdout
                polls, poll_s = polls + 1, poll_s + time.monotonic() - last_poll
                sts = json.loads(out) if out.strip() else []
                for i, st in enumerate(sts):
                    if st is not None and st["state"] in ("failed", "error"):
                        raise RuntimeError("clone %d: %s" % (i, st))
                if len(done) == n and [st and st["state"] for st in sts] != ["complete"] * n:
                    raise RuntimeError("complete flags set, but status --json: %s" % sts)
            for i, p in enumerate(ps):
                if i not in done and p.poll() is not None:
                    with open(os.path.join(tmp, names[i] + ".pid.log")) as f:
                        raise RuntimeError("clone %d exited: %d: %s" % (i, p.returncode,
                                                                        f.read()))
            if time.monotonic() > end:
                raise RuntimeError("clones not complete: %s" % sorted(set(range(n)) - set(done)))
            time.sleep(0.05)
        hwm = [proc_mem(p.pid)["VmHWM"] for p in ps]
        print("    (%d polls of aclone status --json with %d META: %.1f ms each)" % (
            polls, n, poll_s / polls * 1000), flush=True)
    finally:
        for fd in fds.values():
            os.close(fd)
        for p in ps:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in ps:
            stop(p)
    bad = [i for i in range(n) if sha256_range(dests[i], 0, slice_size) != sums[i]
           or os.path.getsize(dests[i]) != slice_size]
    if bad:
        raise RuntimeError("clones %s: dest differs from its source slice" % bad)
    for x in metas + dests:
        drop(x)
    return [done[i] for i in range(n)], hwm


def nbdcopy_round(tmp, n, slice_size, socks, sums):
    outs = [os.path.join(tmp, "nc%02d.img" % i) for i in range(n)]
    for x in outs:
        drop(x)
    settle()
    t0 = time.monotonic()
    ps = [subprocess.Popen(["nbdcopy", "--flush", uri(socks[i]), outs[i]])
          for i in range(n)]
    procs.extend(ps)
    times, rss = poll_finish(ps, t0)
    bad = [i for i in range(n) if sha256_range(outs[i], 0, slice_size) != sums[i]]
    if bad:
        raise RuntimeError("nbdcopy %s: output differs from its source slice" % bad)
    for x in outs:
        drop(x)
    return times, rss


def bench_many_clones(tmp, quick):
    n, slice_size = (16, 64 * MiB) if quick else (64, 64 * MiB)
    rounds = 1 if quick else 2
    img = os.path.join(tmp, "many.img")
    random_file(img, n * slice_size)
    settle()
    sums = [sha256_range(img, i * slice_size, slice_size) for i in range(n)]  # also warms
    ssock = os.path.join(tmp, "many.sock")
    src = start(["file", img], ssock, os.path.join(tmp, "many.pid"))
    slices = []
    try:
        socks = []
        for i in range(n):
            s = os.path.join(tmp, "slice%02d.sock" % i)
            slices.append(start(["--filter=offset", "nbd", "socket=" + ssock,
                                 "offset=%d" % (i * slice_size), "range=%d" % slice_size],
                                s, os.path.join(tmp, "slice%02d.pid" % i)))
            socks.append(s)
        res_a, res_c = [], []
        for _ in range(rounds):         # alternating; the round whose last finished first
            res_c.append(nbdcopy_round(tmp, n, slice_size, socks, sums))
            res_a.append(many_clones_round(tmp, n, slice_size, socks, img, sums))
            for what, (times, mem) in (("nbdcopy", res_c[-1]), ("aclone", res_a[-1])):
                print("    %-7s last %.2f s, median %.2f s, first %.2f s; sum of peak RSS "
                      "%.0f MiB" % (what, max(times), statistics.median(times), min(times),
                                    mib(sum(mem))), flush=True)
    finally:
        for p in slices:
            stop(p)
        stop(src)
        drop(img)
    a_times, a_mem = min(res_a, key=lambda r: max(r[0]))
    c_times, c_mem = min(res_c, key=lambda r: max(r[0]))
    last, clast = max(a_times), max(c_times)
    med = statistics.median(a_times)
    what = "%d x %d MiB" % (n, slice_size // MiB)
    setup = "one nbdkit file of %d MiB random (default threads), per slice nbdkit " \
            "--filter=offset nbd socket=SRC offset=i*%dM range=%dM" % (
                n * slice_size // MiB, slice_size // MiB, slice_size // MiB)
    row("13a. %s clones at once: last complete vs nbdcopy" % what, last, clast, "s",
        "<= 1.3x", last <= 1.3 * clast,
        "%s; %d nbdkit aclone started together, each complete = its header's complete flag "
        "(read every 50 ms; aclone status --json META... every 15 s and at the end: "
        "all complete); peer: %d nbdcopy --flush SLICE out.img at once; every dest "
        "and output sha256 = its slice; best of %d alternating" % (setup, n, n, rounds))
    row("13b. %s clones: slowest vs median completion" % what, last, med, "s", "<= 2x",
        last <= 2 * med, "fairness; completions %.2f..%.2f s" % (min(a_times), last))
    row("13c. %s clones: sum of peak RSS vs nbdcopy's" % what, mib(sum(a_mem)),
        mib(sum(c_mem)), "MiB", "reported", True,
        "sum of VmHWM of the %d nbdkit aclone (max %.1f MiB); peer: sum of ru_maxrss of "
        "the %d nbdcopy" % (n, mib(max(a_mem)), n))
