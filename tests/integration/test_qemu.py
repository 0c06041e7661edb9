"""Integration: qemu's NBD client across a server restart (issue 13
part 5), with qemu-io (qemu's block layer, as a guest's drive uses it).

- The plain drive (`file=nbd+unix:///?socket=...`, no reconnect-delay):
  once the server goes away every request fails with EIO, and it stays
  so after the server is back: qemu 7.2 does not reconnect without a
  reconnect-delay; the drive must be reopened (a guest sees I/O errors).
- The option form with reconnect-delay=N: a request issued while the
  server is down waits (up to N s) and succeeds once it is back; later
  ones succeed as well.  The restart is a SIGTERM, the way systemd
  stops the service (the plugin shuts down the read side of client
  connections, so qemu sees a connection loss, not an orderly quit).

The timeline comes from qemu-io's own `sleep` command; the test follows
the server's request log to stop it only after the first read."""
import os
import signal
import subprocess
import time

from harness import PLUGIN, SANITIZER_ENV, CloneTest, main, wait_for

MiB = 1 << 20


class QemuRestartTest(CloneTest):

    def run_restart(self, opts):
        """qemu-io: read, sleep 2 s, read (server down), sleep 6 s, read,
        read.  The clone is stopped after the first read and started again
        3.5 s later.  Returns qemu-io's output, one line per command."""
        src_path = os.path.join(self.tmp, "source.img")
        with open(src_path, "wb") as f:
            f.write(b"\x5a" * (16 * MiB))
        src = self.source_file(src_path)
        log = os.path.join(self.tmp, "clone-requests.log")
        sock = os.path.join(self.tmp, "clone.sock")

        def start(name):
            return self.server(name, ["--filter=log", PLUGIN, "logfile=" + log,
                                      "source=" + src.uri, "dest=" + self.dest,
                                      "meta=" + self.meta, "hydrate=false"],
                               dict(SANITIZER_ENV))
        c = start("clone")
        self.assertEqual(c.sock, sock)
        cmds = ["read -P 0x5a 0 4k", "sleep 2000", "read -P 0x5a 4k 4k",
                "sleep 6000", "read -P 0x5a 8k 4k", "read -P 0x5a 1M 4k"]
        q = subprocess.Popen(["qemu-io", "--image-opts", opts % sock] +
                             [a for cmd in cmds for a in ("-c", cmd)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
        self.cleanups.append(lambda: q.poll() is None and q.kill())

        def reads():
            try:
                with open(log) as f:
                    return f.read().count(" Read ")
            except OSError:
                return 0
        wait_for(lambda: reads() >= 1, 30, "qemu-io's first read")
        t0 = time.monotonic()
        c.stop(signal.SIGTERM)
        time.sleep(max(0, 3.5 - (time.monotonic() - t0)))
        start("clone")            # the same socket
        out, _ = q.communicate(timeout=60)
        return [l for l in out.splitlines() if "read" in l]

    def test_plain_drive_fails_for_good(self):
        lines = self.run_restart("driver=nbd,server.type=unix,server.path=%s")
        print("\n".join(lines))
        self.assertRegex(lines[0], r"^read 4096/4096 bytes at offset 0")
        self.assertEqual(len(lines), 4, lines)
        for l in lines[1:]:
            self.assertIn("read failed: Input/output error", l)

    def test_reconnect_delay_rides_out_the_restart(self):
        lines = self.run_restart("driver=nbd,server.type=unix,server.path=%s,"
                                 "reconnect-delay=20")
        print("\n".join(lines))
        self.assertEqual(lines, ["read 4096/4096 bytes at offset %d" % o
                                 for o in (0, 4096, 8192, MiB)])


if __name__ == "__main__":
    main()
