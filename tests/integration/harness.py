"""Shared helpers for aclone's integration tests.

Every server a test starts runs in the foreground under --exit-with-parent,
is registered with the test case, and is stopped in tearDown with bounded
waits (SIGTERM, then SIGKILL).  Only Unix sockets in a private temporary
directory are used.
"""
import hashlib
import json
import os
import random
import signal
import shutil
import subprocess
import tempfile
import time
import unittest

import nbd

PLUGIN = os.environ.get("ACLONE_PLUGIN", "build/plugin/aclone.so")
CLI = os.environ.get("ACLONE_CLI", "build/src/aclone")
FAILIO = os.environ.get("ACLONE_FAILIO", "build/tests/integration/failio.so")
# A sanitizer build's plugin needs its runtime preloaded into nbdkit (and
# the CLI); the test process itself runs without it.
SANITIZER_ENV = {}
# Under the preload, an nbdkit that exits after loading libnbd can
# deadlock in p11-kit's destructor (seen with nbdkit's own nbd plugin
# too).  So there a server that refused to start is recognised by its
# error line (Server below), and a bound on how fast a server exits is
# reported as a skipped check (CloneTest.assert_prompt).
SANITIZED = bool(os.environ.get("ACLONE_TEST_PRELOAD"))
if SANITIZED:
    SANITIZER_ENV["LD_PRELOAD"] = os.environ["ACLONE_TEST_PRELOAD"]
# Tests of when the foreground controller acts (how it holds, cuts and
# paces the copy beside a client) run in make check's normal and TSan
# stages; under ASan they would only take the same paths again, slower,
# so check-san sets this and they are reported skipped there.
CONTROLLER_TIMING_ELSEWHERE = bool(os.environ.get("ACLONE_CONTROLLER_TIMING_ELSEWHERE"))


def controller_timing(test):
    """Decorator: a test of the controller's timing (see above)."""
    return unittest.skipIf(CONTROLLER_TIMING_ELSEWHERE,
                           "the controller's timing: checked in the normal "
                           "and tsan stages")(test)


# A sanitizer's report in a server's log fails the test that ran it.
# (LeakSanitizer is not among them: it would report nbdkit's own
# allocations; the unit tests run with leak checks instead.)
SANITIZER_MARKERS = ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer",
                     "runtime error:")
START_TIMEOUT = 20
STOP_TIMEOUT = 10
# Bounds in these tests catch hangs; they do not measure speed (that is
# tests/bench/run's job).  PROMPT is how long "at once" may take on a
# loaded machine: far below every source-timeout a test uses with it.
PROMPT = 5.0


def wait_for(pred, timeout, what, interval=0.05):
    """Poll pred() until it is true; fail after timeout seconds.  (At
    every 20 ms, the CLI runs of status polls were a twelfth of make
    check's CPU; 50 ms is still far below any bound a test sets.)"""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, what))
        time.sleep(interval)


def listening(sock):
    """Does a server listen on this Unix socket yet?  The socket file
    appears at bind(), before listen(), so its existence is not enough;
    and a probe connection would be a client (for a socket-activated
    service, one that starts it).  /proc/net/unix says it without one:
    flag __SO_ACCEPTCON (0x10000) marks a listening socket."""
    path = os.path.realpath(sock)
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                w = line.split()
                if len(w) >= 8 and w[7] in (sock, path) and int(w[3], 16) & 0x10000:
                    return True
    except OSError:
        pass
    return False


class Daemon:
    """A server process a test started: output in NAME.log in the test's
    directory, started and stopped with bounded waits.  ready() says when
    it serves; refused() (optional) when it will not, though it has not
    exited yet."""

    def __init__(self, tmp, name, cmd, ready, env=None, what=None,
                 preexec_fn=None):
        self.name = name
        self.logpath = os.path.join(tmp, name + ".log")
        self.log = open(self.logpath, "ab")
        e = dict(os.environ)
        if env:
            e.update(env)
        what = what or "%s %s" % (cmd[0], name)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=e,
                                     preexec_fn=preexec_fn)
        try:
            wait_for(lambda: ready() or self.proc.poll() is not None
                     or self.refused(), START_TIMEOUT, what + " to start")
        except AssertionError:
            self.stop(signal.SIGKILL)
            raise
        if self.proc.poll() is None and not ready():
            self.stop(signal.SIGKILL)           # refused, hung on its way out
        if self.proc.poll() is not None:
            self.log.close()
            raise RuntimeError("%s exited with %s:\n%s" %
                               (what, self.proc.returncode, self.output()))

    def refused(self):
        return False

    def output(self):
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def freeze(self, timeout=10):
        """SIGSTOP the process and wait until every thread of it is
        stopped.  kill() returns once the stop is pending, and the kernel
        wakes one thread to act on it; the others run on (and may answer
        a request) until that thread is scheduled, which under make
        check's load took long enough for a test's read to be served.
        Returns a function that resumes it (SIGCONT)."""
        pid = self.proc.pid
        os.kill(pid, signal.SIGSTOP)

        def all_stopped():
            try:
                tids = os.listdir("/proc/%d/task" % pid)
                states = []
                for t in tids:
                    with open("/proc/%d/task/%s/stat" % (pid, t)) as f:
                        # The state follows the ")" closing the name.
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, ProcessLookupError):
                return False
            return bool(states) and all(st in ("T", "t") for st in states)
        try:
            wait_for(all_stopped, timeout, "%s to stop (SIGSTOP)" % self.name,
                     interval=0.005)
        except BaseException:
            os.kill(pid, signal.SIGCONT)    # else its stop waits it out
            raise
        return lambda: os.kill(pid, signal.SIGCONT)

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """Stop the server; returns seconds it took to exit."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        if not self.log.closed:
            self.log.close()
        return time.monotonic() - t0


class Server(Daemon):
    """An nbdkit process serving on a Unix socket (or 127.0.0.1)."""

    def __init__(self, tmp, name, args, env=None, tcp_port=None, wrapper=()):
        self.tcp_port = tcp_port
        self.sock = os.path.join(tmp, name + ".sock")
        self.pidfile = os.path.join(tmp, name + ".pid")
        for p in (self.sock, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        self.args = args
        listen = (["-i", "127.0.0.1", "-p", str(tcp_port)] if tcp_port
                  else ["-U", self.sock])
        cmd = list(wrapper) + ["nbdkit", "-f", "--exit-with-parent"] + listen + \
              ["-P", self.pidfile] + args
        super().__init__(tmp, name, cmd, lambda: os.path.exists(self.pidfile),
                         env, "nbdkit %s" % name)

    def refused(self):
        """Under the sanitizer preload: has nbdkit printed an error and,
        half a second later, still not started serving?  (It may then
        hang in its exit: see SANITIZED.)"""
        if not SANITIZED or " error: " not in self.output():
            return False
        time.sleep(0.5)
        return not os.path.exists(self.pidfile)

    def stop(self, sig=signal.SIGTERM, timeout=STOP_TIMEOUT):
        """As Daemon.stop.  Under the sanitizer preload an nbdkit can hang
        in p11-kit on its way out after the plugin has stopped ("stopped
        in ..."): it gets a second, not the whole timeout, then SIGKILL."""
        if SANITIZED and sig == signal.SIGTERM and self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(sig)
            try:
                wait_for(lambda: self.proc.poll() is not None
                         or "aclone: stopped in" in self.output(), timeout,
                         "nbdkit %s to stop" % self.name)
                self.proc.wait(1)
            except (AssertionError, subprocess.TimeoutExpired):
                pass
            super().stop(signal.SIGKILL, timeout)
            return time.monotonic() - t0
        return super().stop(sig, timeout)

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def connect(self):
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_unix(self.sock)
        return h


def free_tcp_port():
    """A port on 127.0.0.1 that was free a moment ago."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_random_file(path, size, seed=1, sparse_chunks=None):
    """Random data; with sparse_chunks=(chunk, keep_every), only every
    keep_every-th chunk holds data and the rest are holes."""
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        if sparse_chunks is None:
            pos = 0
            while pos < size:
                n = min(4 << 20, size - pos)
                f.write(rnd.randbytes(n))
                pos += n
        else:
            chunk, every = sparse_chunks
            for i, pos in enumerate(range(0, size, chunk)):
                if i % every == 0:
                    f.seek(pos)
                    f.write(rnd.randbytes(min(chunk, size - pos)))


def sha(path_or_bytes):
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray)):
        h.update(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
    return h.hexdigest()


def read_all(h):
    size = h.get_size()
    out = bytearray()
    pos = 0
    while pos < size:
        n = min(16 << 20, size - pos)
        out += h.pread(n, pos)
        pos += n
    return bytes(out)


def cli(*args, check=True, timeout=60):
    p = subprocess.run([CLI] + list(args), capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, **SANITIZER_ENV))
    if check and p.returncode != 0:
        raise AssertionError("aclone %s failed (%d): %s" % (" ".join(args),
                                                           p.returncode, p.stderr))
    return p


def status(meta):
    return json.loads(cli("status", "--json", meta).stdout)


class CloneTest(unittest.TestCase):
    """Base class: a temp dir, servers stopped at teardown."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="aclone-it-")
        self.servers = []
        self.cleanups = []
        self.dest = os.path.join(self.tmp, "dest.img")
        self.meta = os.path.join(self.tmp, "clone.meta")

    def tearDown(self):
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as e:          # keep cleaning up
                print("cleanup failed:", e)
        failed = False
        outcome = getattr(self, "_outcome", None)
        if outcome is not None:
            result = getattr(outcome, "result", None)
            errs = getattr(result, "errors", []) + getattr(result, "failures", [])
            failed = any(t is self for t, _ in errs)
        reports = []
        for s in reversed(self.servers):      # clients before their sources
            s.stop()
            out = s.output()
            if failed:
                print("---- log of %s ----\n%s" % (s.name, out[-4000:]))
            for marker in SANITIZER_MARKERS:
                i = out.find(marker)
                if i >= 0:
                    reports.append("%s: %s" % (s.name, out[max(0, i - 200):i + 6000]))
        shutil.rmtree(self.tmp, ignore_errors=True)
        if reports:
            self.fail("sanitizer report in a server's log:\n" + "\n".join(reports))

    def assert_prompt(self, took, bound, what):
        """took (seconds) is below bound: a check that catches a hang.
        Under the sanitizer preload a server's exit can hang in p11-kit
        (see SANITIZED), so there the check is reported as skipped, in a
        line tests/summary.py lists."""
        if SANITIZED:
            print("check skipped: %s: %s (%.1f s) is not bounded under the "
                  "sanitizer preload" % (self.id(), what, took))
            return
        self.assertLess(took, bound, what)

    def server(self, name, args, env=None, tcp_port=None, wrapper=()):
        """An nbdkit serving args; wrapper: a command that runs it."""
        s = Server(self.tmp, name, args, env, tcp_port, wrapper)
        self.servers.append(s)
        return s

    def source_file(self, path, name="source", filters=(), extra=()):
        args = ["--filter=%s" % f for f in filters] + ["file", path] + list(extra)
        return self.server(name, args)

    def clone(self, source=None, name="clone", dest=None, meta=None,
              tcp_port=None, wrapper=(), **params):
        args = [PLUGIN]
        if source is not None:
            args.append("source=" + (source.uri if isinstance(source, Server) else source))
        args += ["dest=" + (dest or self.dest), "meta=" + (meta or self.meta)]
        for k, v in params.items():
            args.append("%s=%s" % (k.replace("_", "-"), v))
        env = {}
        env.update(SANITIZER_ENV)
        return self.server(name, args, env, tcp_port, wrapper)

    def failio_clone(self, src, name="clone", **params):
        """A clone under tests/integration/failio.c: while self.sync_trigger
        exists its dest syncs fail, while self.write_trigger exists its
        dest pwrites fail, while self.hold_trigger exists they wait, while
        self.settle_trigger exists the next sync_file_range that waits
        fails (once)."""
        self.sync_trigger = os.path.join(self.tmp, "fail-sync")
        self.write_trigger = os.path.join(self.tmp, "fail-write")
        self.hold_trigger = os.path.join(self.tmp, "hold-write")
        self.settle_trigger = os.path.join(self.tmp, "fail-settle")
        preload = " ".join(p for p in (SANITIZER_ENV.get("LD_PRELOAD"),
                                       os.path.abspath(FAILIO)) if p)
        env = {"LD_PRELOAD": preload, "FAILIO_PATH": os.path.realpath(self.dest),
               "FAILIO_SYNC_TRIGGER": self.sync_trigger,
               "FAILIO_WRITE_TRIGGER": self.write_trigger,
               "FAILIO_HOLD_TRIGGER": self.hold_trigger,
               "FAILIO_SETTLE_TRIGGER": self.settle_trigger}
        args = ["%s=%s" % (k.replace("_", "-"), v) for k, v in params.items()]
        return self.server(name, [PLUGIN, "source=" + src.uri, "dest=" + self.dest,
                                  "meta=" + self.meta] + args, env)

    def status_becomes(self, timeout=5, **want):
        """The live page is published once a second: wait until the status
        shows every key=value in want, or fail showing the last status."""
        last = {}

        def ok():
            last.clear()
            last.update(status(self.meta))
            return all(last.get(k) == v for k, v in want.items())
        try:
            wait_for(ok, timeout, "status %s" % want, interval=0.1)
        except AssertionError:
            raise AssertionError("status never showed %s; last: %s" % (want, last))
        return dict(last)

    def random_file(self, size, seed, name="source.img"):
        """A file of random bytes in the test's directory: (path, bytes)."""
        path = os.path.join(self.tmp, name)
        write_random_file(path, size, seed=seed)
        with open(path, "rb") as f:
            return path, f.read()

    def finish_and_check(self, h, server, want, src_path, timeout=60):
        """Lift the rate limit and wait for completion; the clone (through
        h) must read want, and once server is stopped, dest must equal
        the source file."""
        cli("set", self.meta, "rate=0")
        self.wait_complete(timeout)
        self.assertEqual(read_all(h), want)
        h.shutdown()
        server.stop()
        self.assertEqual(sha(self.dest), sha(src_path))

    def wait_complete(self, timeout=60):
        return wait_for(lambda: status(self.meta)["state"] == "complete", timeout,
                        "hydration to complete", interval=0.1)


def main():
    """Run the module's tests; exit 77 (meson: skipped) if all skipped."""
    import __main__
    suite = unittest.defaultTestLoader.loadTestsFromModule(__main__)
    if len(__import__("sys").argv) > 1:
        suite = unittest.defaultTestLoader.loadTestsFromNames(
            __import__("sys").argv[1:], __main__)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    for test, reason in result.skipped:       # for tests/summary.py
        print("test skipped: %s: %s" % (test.id(), reason))
    if not result.wasSuccessful():
        raise SystemExit(1)
    if result.testsRun and len(result.skipped) == result.testsRun:
        raise SystemExit(77)
    raise SystemExit(0)


def crc32c(data):
    crc = 0xffffffff
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82f63b78 & -(crc & 1))
    return crc ^ 0xffffffff


HEADER_LEN = 376
CHECKSUM_OFF = 368


def patch_header(path, offset, data, fix_checksum=True):
    """Overwrite header bytes; optionally recompute the checksum so that
    only the field itself is wrong."""
    import struct
    with open(path, "r+b") as f:
        hdr = bytearray(f.read(HEADER_LEN))
        hdr[offset:offset + len(data)] = data
        if fix_checksum:
            hdr[CHECKSUM_OFF:CHECKSUM_OFF + 4] = b"\0\0\0\0"
            hdr[CHECKSUM_OFF:CHECKSUM_OFF + 4] = struct.pack("<I", crc32c(bytes(hdr)))
        f.seek(0)
        f.write(hdr)
