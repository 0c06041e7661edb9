"""Integration: "aclone status/inspect/wait" look at a clone's metadata
file without disturbing its server.

The CLI asks whether a server holds the file ("in use") by testing the
server's lock, never by taking one: a server starting at that instant
must not be refused as "in use by another aclone server (pid 0)".  And
the header the server rewrites while it runs (flags, at every stop) is
never reported as corrupt.  The server's lock is held by the process
nbdkit forks into the background, and a second server is refused naming
that process's pid.
"""
import fcntl
import json
import os
import signal
import subprocess
import threading

from harness import (CLI, PLUGIN, SANITIZER_ENV, START_TIMEOUT, STOP_TIMEOUT,
                     CloneTest, main, status, wait_for, write_random_file)

MiB = 1 << 20


class MetaProbeTest(CloneTest):

    def setUp(self):
        super().setUp()
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, 4 * MiB)
        self.src = self.source_file(self.src_path)

    def clone_once(self, name="clone"):
        """Start a clone server (hydration off: it stays incomplete, so
        every stop rewrites the header's dest-zero flag)."""
        return self.clone(self.src, name=name, hydrate="false")

    def test_status_loop_never_disturbs_server(self):
        # The first server creates the metadata file.
        c = self.clone_once()
        c.stop()
        self.servers.remove(c)

        stop = threading.Event()
        bad = []                  # (command, returncode, output)
        seen = {"probes": 0, "in_use": 0}

        def prober(cmd):
            while not stop.is_set():
                p = subprocess.run([CLI] + cmd + [self.meta], capture_output=True,
                                   text=True, timeout=60,
                                   env=dict(os.environ, **SANITIZER_ENV))
                seen["probes"] += 1
                out = p.stdout + p.stderr
                if p.returncode != 0:
                    bad.append((cmd, p.returncode, out))
                    continue
                if cmd[0] == "status":
                    try:
                        st = json.loads(p.stdout)
                    except ValueError:
                        bad.append((cmd, p.returncode, out))
                        continue
                    if st.get("pid"):
                        seen["in_use"] += 1
                elif "valid:         yes" not in p.stdout:
                    bad.append((cmd, p.returncode, out))

        threads = [threading.Thread(target=prober, args=(cmd,), daemon=True)
                   for cmd in (["status", "--json"], ["inspect"])]
        for t in threads:
            t.start()
        try:
            for i in range(8):
                # Every start must succeed whatever the probes do.
                c = self.clone_once(name="clone%d" % i)
                wait_for(lambda: seen["in_use"] > 0, START_TIMEOUT,
                         "status to show the server running")
                seen["in_use"] = 0
                c.stop()
                self.servers.remove(c)
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        self.assertGreater(seen["probes"], 0)
        self.assertEqual(bad, [], "status/inspect failed while servers "
                         "started and stopped")
        self.assertEqual(status(self.meta)["state"], "stopped")

    def test_shared_flock_does_not_refuse_server(self):
        # What the CLI's old probe took for a moment: a shared flock.  The
        # server's lock is not a flock, so it must start all the same.
        c = self.clone_once()
        c.stop()
        self.servers.remove(c)
        with open(self.meta, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            c = self.clone_once(name="clone2")
            st = self.status_becomes(pid=c.proc.pid)
            self.assertEqual(st["state"], "paused")
        c.stop()
        self.assertEqual(status(self.meta)["state"], "stopped")

    def test_forked_server_holds_the_lock(self):
        # nbdkit without -f forks into the background after the plugin
        # opened the file: the child must hold the lock.
        sock = os.path.join(self.tmp, "bg.sock")
        pidfile = os.path.join(self.tmp, "bg.pid")
        log = os.path.join(self.tmp, "bg.log")
        args = ["nbdkit", "-U", sock, "-P", pidfile, PLUGIN,
                "source=" + self.src.uri, "dest=" + self.dest,
                "meta=" + self.meta, "hydrate=false"]
        with open(log, "wb") as lf:
            p = subprocess.run(args, stdout=lf, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=START_TIMEOUT,
                               env=dict(os.environ, **SANITIZER_ENV))
        with open(log, "rb") as lf:
            out = lf.read().decode(errors="replace")
        self.assertEqual(p.returncode, 0, out)
        wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read().strip(),
                 START_TIMEOUT, "the pid file")
        pid = int(open(pidfile).read())

        exited = []

        def gone():
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                exited.append(True)
                return True

        def kill():
            if not exited and not gone():
                os.kill(pid, signal.SIGKILL)
                wait_for(gone, STOP_TIMEOUT, "the forked server to die")
        self.cleanups.append(kill)

        # (Paused from the first publish, before nbdkit writes the pid
        # file; the pid shows once the clone has started, just after.)
        self.status_becomes(timeout=START_TIMEOUT, pid=pid, state="paused")
        self.assertIn("in use:        yes",
                      subprocess.run([CLI, "inspect", self.meta], text=True,
                                     capture_output=True, timeout=60).stdout)
        # A second server is refused, naming the forked server's pid.
        with self.assertRaises(RuntimeError) as e:
            self.clone(self.src, name="second",
                       dest=os.path.join(self.tmp, "d2"))
        self.assertIn("in use by another aclone server (pid %d)" % pid,
                      str(e.exception))
        self.assertIn(self.meta, str(e.exception))
        # Stopped, it releases the lock: a new server starts.
        os.kill(pid, signal.SIGTERM)
        wait_for(gone, STOP_TIMEOUT, "the forked server to exit")
        self.assertEqual(status(self.meta)["state"], "stopped")
        c = self.clone_once(name="after")
        self.status_becomes(pid=c.proc.pid)


if __name__ == "__main__":
    main()
