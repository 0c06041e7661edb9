"""Integration: the systemd template units.  systemd-analyze verify lints
them; systemd-socket-activate (no running systemd needed) runs the
service's own ExecStart, read from the unit file, with an environment file
as the unit would get, on a socket passed in the way systemd passes it.
Then: data through it, a stop with a client attached (the listening socket
came from systemd, not nbdkit), a restart by the next connection, and an
empty SOURCE once the clone is complete."""
import os
import re
import shutil
import signal
import subprocess
import time
import unittest

import nbd

from harness import (CloneTest, PLUGIN, PROMPT, SANITIZER_ENV, listening,
                     SANITIZER_MARKERS, main,
                     read_all, status, wait_for, write_random_file)

MiB = 1 << 20
UNITS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                     "..", "..", "plugin", "systemd")


def unit_exec_start():
    with open(os.path.join(UNITS, "aclone@.service")) as f:
        for line in f:
            if line.startswith("ExecStart="):
                return line[len("ExecStart="):].split()
    raise AssertionError("no ExecStart in aclone@.service")


def expand(words, env):
    """systemd's rules: ${VAR} is one word (possibly empty), a lone $VAR
    splits into words and vanishes when empty."""
    out = []
    for w in words:
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", w)
        if m:
            out += env.get(m.group(1), "").split()
            continue
        out.append(re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}",
                          lambda m: env.get(m.group(1), ""), w))
    return out


def read_env_file(path):
    env = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, _, v = line.partition("=")
                env[k] = v
    return env


@unittest.skipUnless(shutil.which("systemd-socket-activate") and
                     shutil.which("systemd-analyze"), "systemd tools missing")
class SystemdTest(CloneTest):

    def test_units_lint_clean(self):
        d = os.path.join(self.tmp, "units")
        os.mkdir(d)
        for kind in ("socket", "service"):
            shutil.copy(os.path.join(UNITS, "aclone@." + kind),
                        os.path.join(d, "aclone@vol." + kind))
        r = subprocess.run(["systemd-analyze", "verify", "--man=no",
                            os.path.join(d, "aclone@vol.socket"),
                            os.path.join(d, "aclone@vol.service")],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        # Only the known noise of running in a container: no unit warnings.
        bad = [l for l in r.stderr.splitlines() if "aclone@" in l]
        self.assertEqual(bad, [], r.stderr)
        words = unit_exec_start()
        self.assertEqual(words[0], "/usr/bin/nbdkit")
        self.assertNotIn("-U", words)          # the socket comes from systemd
        self.assertIn("--foreground", words)

    def activate(self, envfile, sock):
        env = read_env_file(envfile)
        argv = expand(unit_exec_start(), env)
        argv[argv.index("aclone")] = PLUGIN     # the build tree's plugin
        log = open(os.path.join(self.tmp, "activate.log"), "ab")
        # systemd-socket-activate gives the service only the variables
        # named with -E, as systemd would: pass the sanitizer's on.
        passed = dict(SANITIZER_ENV)
        for k in ("ASAN_OPTIONS", "UBSAN_OPTIONS", "TSAN_OPTIONS"):
            if k in os.environ:
                passed[k] = os.environ[k]
        setenv = []
        for k, v in passed.items():
            setenv += ["-E", "%s=%s" % (k, v)]
        p = subprocess.Popen(["systemd-socket-activate", "-l", sock] + setenv + argv,
                             stdout=log, stderr=subprocess.STDOUT)
        self.cleanups.append(lambda: (p.poll() is None and p.kill(), p.wait(10)))
        wait_for(lambda: listening(sock), 10, "the socket to listen")
        return p

    def log(self):
        with open(os.path.join(self.tmp, "activate.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def connect(self, sock):
        h = nbd.NBD()
        h.connect_unix(sock)
        return h

    def test_socket_activation(self):
        src_path = os.path.join(self.tmp, "source.img")
        write_random_file(src_path, 32 * MiB, seed=31)
        with open(src_path, "rb") as f:
            model = bytearray(f.read())
        src = self.source_file(src_path)
        envfile = os.path.join(self.tmp, "vol.conf")
        with open(envfile, "w") as f:
            f.write("SOURCE=%s\nDEST=%s\nMETA=%s\nACLONE_OPTS=hydrate-rate=8M "
                    "source-timeout=10\n" % (src.uri, self.dest, self.meta))
        sock = os.path.join(self.tmp, "vol.sock")
        p = self.activate(envfile, sock)
        # The first connection starts nbdkit on the passed socket.
        h = self.connect(sock)
        self.assertEqual(h.get_size(), len(model))
        self.assertEqual(h.pread(MiB, 5 * MiB), bytes(model[5 * MiB:6 * MiB]))
        h.pwrite(b"\x42" * 8192, 7 * MiB)
        model[7 * MiB:7 * MiB + 8192] = b"\x42" * 8192
        self.assertEqual(status(self.meta)["pid"], p.pid)
        # Stop with the client attached: nbdkit got its listening socket
        # from systemd, and the graceful stop still finds the clients.
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.wait(10)
        took = time.monotonic() - t0
        self.assert_prompt(took, PROMPT, "SIGTERM to exit, client attached")
        self.assertIn("metadata committed and unlocked", self.log())
        with self.assertRaises(Exception):
            h.pread(4096, 0)
        # systemd would start the service again on the next connection.
        os.unlink(sock)
        self.activate(envfile, sock)
        h = self.connect(sock)
        self.assertEqual(h.pread(8192, 7 * MiB), b"\x42" * 8192)
        from harness import cli
        cli("set", self.meta, "rate=0")
        self.wait_complete(60)
        self.assertEqual(read_all(h), bytes(model))
        h.shutdown()

        # Complete: an empty SOURCE serves the clone alone.
        src.stop()
        with open(envfile, "w") as f:
            f.write("SOURCE=\nDEST=%s\nMETA=%s\nACLONE_OPTS=\n" % (self.dest, self.meta))
        for q in list(self.cleanups):
            q()
        self.cleanups.clear()
        os.unlink(sock)
        self.activate(envfile, sock)
        h = self.connect(sock)
        self.assertEqual(read_all(h), bytes(model))
        h.shutdown()
        for q in self.cleanups:
            q()
        self.cleanups.clear()
        for marker in SANITIZER_MARKERS:
            self.assertNotIn(marker, self.log())


if __name__ == "__main__":
    main()
