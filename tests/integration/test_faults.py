"""Integration: surviving faults.  The source goes away and comes back
mid-hydration and mid-read; the server is killed with SIGKILL at random
moments while clients write and flush, and restarted on the same files."""
import os
import random
import signal
import threading
import time
import unittest

import nbd

from harness import (CloneTest, SANITIZED, main, read_all, sha, status,
                     wait_for, write_random_file)

MiB = 1 << 20
RS = 64 * 1024
ROUNDS = int(os.environ.get("ACLONE_KILL_ROUNDS", "30"))


class OutageTest(CloneTest):

    def test_source_outage_and_return(self):
        src_path = os.path.join(self.tmp, "source.img")
        write_random_file(src_path, 64 * MiB, seed=4)
        with open(src_path, "rb") as f:
            want = f.read()
        src = self.source_file(src_path)
        c = self.clone(src, hydrate_rate="4M", source_timeout="20")
        h = c.connect()
        self.assertEqual(h.pread(RS, 0), want[:RS])          # region 0 hydrated
        self.status_becomes(state="hydrating")
        src.stop(signal.SIGKILL)
        # Hydrated regions are served throughout, at once.
        t0 = time.monotonic()
        self.assertEqual(h.pread(RS, 0), want[:RS])
        self.assertLess(time.monotonic() - t0, 1)
        self.status_becomes(state="waiting", timeout=10)
        # A read of an unhydrated region waits for the source...
        result = {}

        def reader():
            h2 = c.connect()
            try:
                result["data"] = h2.pread(RS, 60 * MiB)
            except nbd.Error as e:
                result["error"] = e
            result["t"] = time.monotonic()
            h2.shutdown()
        t = threading.Thread(target=reader)
        t.start()
        time.sleep(2)
        self.assertNotIn("data", result)
        # ... and succeeds when the source is back within source-timeout.
        src2 = self.source_file(src_path, name="source")
        t.join(30)
        self.assertFalse(t.is_alive())
        self.assertEqual(result.get("data"), want[60 * MiB:60 * MiB + RS],
                         result.get("error"))
        # Hydration resumes by itself and completes.
        self.status_becomes(state="hydrating", timeout=15)
        from harness import cli
        cli("set", self.meta, "rate=0")
        self.wait_complete(60)
        self.assertEqual(read_all(h), want)
        h.shutdown()
        c.stop()
        self.assertEqual(sha(self.dest), sha(src_path))

    def test_read_fails_with_eio_after_source_timeout(self):
        src_path = os.path.join(self.tmp, "source.img")
        write_random_file(src_path, 16 * MiB, seed=5)
        src = self.source_file(src_path)
        c = self.clone(src, hydrate="false", source_timeout="3")
        h = c.connect()
        h.pread(RS, 0)
        src.stop(signal.SIGKILL)
        t0 = time.monotonic()
        with self.assertRaises(nbd.Error) as e:
            h.pread(RS, 8 * MiB)
        took = time.monotonic() - t0
        self.assertEqual(e.exception.errno, "EIO")
        self.assertGreaterEqual(took, 2.5)
        self.assertLess(took, 6)                  # never hangs past the timeout
        wait_for(lambda: status(self.meta)["errors"] > 0, 5, "error counted")
        self.assertIn("8388608", status(self.meta)["last_error"])
        self.assertEqual(h.pread(RS, 0)[:10], open(src_path, "rb").read(10))
        h.shutdown()
        took = c.stop()
        if not SANITIZED:       # exit after libnbd errors hangs under the preload
            self.assertLess(took, 3.0)            # and stops promptly


def unexplained(got, durable, maybe):
    """First offset whose byte is neither the durable value nor an allowed
    unflushed write, or None.  Compares 64 KiB chunks first: fast."""
    for base in range(0, len(got), RS):
        if got[base:base + RS] == durable[base:base + RS]:
            continue
        for i in range(base, min(base + RS, len(got))):
            if got[i] != durable[i] and got[i] not in maybe.get(i, ()):
                return i
    return None


class KillTest(CloneTest):

    def test_kill9_rounds(self):
        """Kill -9 the server at random moments while a client writes,
        flushes and reads and hydration runs.  After each restart: every
        write acknowledged before an acknowledged flush is there, and every
        byte is either the source's or some write's."""
        size = 16 * MiB
        src_path = os.path.join(self.tmp, "source.img")
        write_random_file(src_path, size, seed=6)
        with open(src_path, "rb") as f:
            source = f.read()
        src = self.source_file(src_path)
        rnd = random.Random(77)
        durable = bytearray(source)   # state every flushed write has reached
        # For bytes written since the last flush: the allowed values.
        maybe = {}                    # offset -> set of allowed byte values
        incomplete = 0                # rounds that began on a partial clone
        # Verification reads must not hydrate (copy-on-read=false) and
        # hydration must be slow: else the clone is complete after a round
        # and later rounds never exercise the bitmap.
        for rnd_i in range(ROUNDS):
            c = self.clone(src, name="clone%d" % rnd_i, hydrate_rate="128K",
                           hydrate_batch="64K",
                           copy_on_read="false")
            h = c.connect()
            if status(self.meta)["state"] != "complete":
                incomplete += 1
            # 1. The state after the previous crash.
            got = read_all(h)
            bad = unexplained(got, durable, maybe)
            if bad is not None:
                self.fail("round %d: byte %d is %d, neither flushed data %d "
                          "nor an unflushed write" % (rnd_i, bad, got[bad],
                                                      durable[bad]))
            # What the clone holds now is the new baseline.
            durable = bytearray(got)
            maybe = {}
            # 2. Writes and flushes until a random kill.
            deadline = time.monotonic() + rnd.uniform(0.05, 0.6)
            pending = []
            try:
                while time.monotonic() < deadline:
                    n = rnd.randint(1, 3 * RS)
                    off = rnd.randrange(0, size - n)
                    data = bytes([rnd.randrange(256)]) * n
                    h.pwrite(data, off)
                    pending.append((off, data))
                    for k in range(off, off + n):
                        maybe.setdefault(k, set()).add(data[0])
                    if rnd.random() < 0.3:
                        h.flush()
                        for o, d in pending:
                            durable[o:o + len(d)] = d
                        for o, d in pending:
                            for k in range(o, o + len(d)):
                                maybe.pop(k, None)
                        pending = []
            finally:
                c.stop(signal.SIGKILL)
                self.servers.remove(c)
            # Bytes written after the last flush may be old or new.
            for o, d in pending:
                for k in range(o, o + len(d)):
                    maybe.setdefault(k, set()).add(durable[k])
        self.assertGreaterEqual(incomplete, ROUNDS // 2,
                                "the clone completed early: rounds proved little")
        # Finally: hydration completes and dest equals what the clone shows.
        c = self.clone(src, name="final")
        h = c.connect()
        got = read_all(h)
        self.assertIsNone(unexplained(got, durable, maybe))
        self.wait_complete(60)
        h.shutdown()
        c.stop()
        self.assertEqual(sha(self.dest), sha(got))


if __name__ == "__main__":
    main()
