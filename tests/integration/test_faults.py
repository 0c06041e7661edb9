"""Integration: surviving faults.  The source goes away and comes back
mid-hydration and mid-read; the server is killed with SIGKILL at random
moments while clients write and flush, and restarted on the same files."""
import os
import random
import signal
import threading
import time

import nbd

from harness import (CloneTest, PROMPT, cli, main, read_all, sha, status,
                     wait_for, write_random_file)

MiB = 1 << 20
RS = 64 * 1024
ROUNDS = int(os.environ.get("ACLONE_KILL_ROUNDS", "30"))


def assert_eio_after(test, h, offset, timeout):
    """A read of one region at offset fails with EIO once the source-timeout
    has passed: not before it (less a little for the clock), and not much
    after it (PROMPT: a bound that catches a hang, not a measure)."""
    low, high = timeout - 0.5, timeout + PROMPT
    t0 = time.monotonic()
    with test.assertRaises(nbd.Error) as e:
        h.pread(RS, offset)
    took = time.monotonic() - t0
    test.assertEqual(e.exception.errno, "EIO")
    test.assertGreaterEqual(took, low)
    test.assertLess(took, high)


def background_read(server, offset):
    """Start a thread reading one region at offset on a new connection;
    returns (thread, result) where result gets "data" or "error"."""
    result = {}

    def reader():
        h = server.connect()
        try:
            result["data"] = h.pread(RS, offset)
            h.shutdown()
        except Exception as e:             # an NBD error, or no server
            result["error"] = e
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return t, result


class OutageTest(CloneTest):

    def test_source_outage_and_return(self):
        src_path = os.path.join(self.tmp, "source.img")
        write_random_file(src_path, 64 * MiB, seed=4)
        with open(src_path, "rb") as f:
            want = f.read()
        src = self.source_file(src_path)
        # Paused until just before the outage, however slowly the server
        # started: the region read below must still be on the source.
        c = self.clone(src, hydrate="false", hydrate_rate="4M", source_timeout="20")
        h = c.connect()
        self.assertEqual(h.pread(RS, 0), want[:RS])          # region 0 hydrated
        cli("resume", self.meta)
        self.status_becomes(state="hydrating")
        src.stop(signal.SIGKILL)
        # Hydrated regions are served throughout, without waiting for the
        # source (20 s).
        t0 = time.monotonic()
        self.assertEqual(h.pread(RS, 0), want[:RS])
        self.assertLess(time.monotonic() - t0, PROMPT)
        self.status_becomes(state="waiting", timeout=10)
        # A read of an unhydrated region waits for the source...
        t, result = background_read(c, 60 * MiB)
        time.sleep(2)
        self.assertNotIn("data", result)
        # ... and succeeds when the source is back within source-timeout.
        self.source_file(src_path, name="source")
        t.join(30)
        self.assertFalse(t.is_alive())
        self.assertEqual(result.get("data"), want[60 * MiB:60 * MiB + RS],
                         result.get("error"))
        # Hydration resumes by itself and completes.
        self.status_becomes(state="hydrating", timeout=15)
        self.finish_and_check(h, c, want, src_path)

    def test_read_fails_with_eio_after_source_timeout(self):
        src_path = os.path.join(self.tmp, "source.img")
        write_random_file(src_path, 16 * MiB, seed=5)
        src = self.source_file(src_path)
        c = self.clone(src, hydrate="false", source_timeout="3")
        h = c.connect()
        h.pread(RS, 0)
        src.stop(signal.SIGKILL)
        assert_eio_after(self, h, 8 * MiB, 3)
        wait_for(lambda: status(self.meta)["errors"] > 0, 5, "error counted")
        self.assertIn("8388608", status(self.meta)["last_error"])
        self.assertEqual(h.pread(RS, 0)[:10], open(src_path, "rb").read(10))
        h.shutdown()
        self.assert_prompt(c.stop(), PROMPT, "SIGTERM to exit after source errors")


def unexplained(got, durable, maybe):
    """First offset whose byte is neither the durable value nor that of an
    unflushed write, or None.  maybe: the unflushed writes, as [(start,
    end, byte)] (each write is one byte value repeated).  Compares 64 KiB
    chunks first: fast."""
    for base in range(0, len(got), RS):
        end = min(base + RS, len(got))
        if got[base:end] == durable[base:end]:
            continue
        near = [(s, e, v) for s, e, v in maybe if s < end and e > base]
        for i in range(base, end):
            if got[i] != durable[i] and not any(s <= i < e and v == got[i]
                                                for s, e, v in near):
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
        # Writes not flushed when the server was killed: (start, end, byte).
        maybe = []
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
            maybe = []
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
                    # A handful of writes a round: whole regions written
                    # are hydrated, and the clone must stay partial.
                    time.sleep(0.05)
                    if rnd.random() < 0.3:
                        h.flush()
                        for o, d in pending:
                            durable[o:o + len(d)] = d
                        pending = []
            finally:
                c.stop(signal.SIGKILL)
                self.servers.remove(c)
            # Bytes written after the last flush may be old or new.
            maybe = [(o, o + len(d), d[0]) for o, d in pending]
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


class HungSourceTest(CloneTest):
    """A source that stops answering while its connections stay up (here:
    SIGSTOP) is as lost as one that went away: reads fail with EIO at
    source-timeout, hydration notices and reconnects, and all is well
    once it answers again."""

    def test_hung_source(self):
        src_path, want = self.random_file(32 * MiB, seed=8)
        # --threads=1: nbdkit 1.32 can abort when a client closes while
        # several of its replies are queued (fixed upstream in 1.34), and
        # closing a hung connection is exactly what we test.
        src = self.server("source", ["--threads=1", "file", src_path])
        timeout = 8             # above PROMPT: "at once" is told from it
        # Paused until just before the hang (see test_source_outage_and_return).
        c = self.clone(src, hydrate="false", hydrate_rate="2M",
                       source_timeout=str(timeout))
        h = c.connect()
        self.assertEqual(h.pread(RS, 0), want[:RS])
        cli("resume", self.meta)
        self.status_becomes(state="hydrating")
        self.cleanups.append(src.freeze())
        # Hydrated data is served during the hang, without waiting for it.
        t0 = time.monotonic()
        self.assertEqual(h.pread(RS, 0), want[:RS])
        self.assertLess(time.monotonic() - t0, PROMPT)
        # An unhydrated read gives up at the timeout, not later.  (If it
        # returns data, say what was hydrated, to tell how.)
        try:
            assert_eio_after(self, h, 30 * MiB, timeout)
        except AssertionError:
            print("status: %s\nmap:\n%s" % (status(self.meta),
                                             cli("inspect", "--map", self.meta).stdout))
            raise
        # The hydrator saw the hang too, and status shows the outage.
        wait_for(lambda: "no reply for %d s" % timeout in c.output(), 2 * timeout,
                 "the hydrator to notice the hang")
        st = wait_for(lambda: (lambda s: s["state"] in ("waiting", "error")
                                         and s)(status(self.meta)),
                      5, "status to show the outage")
        self.assertGreater(st["errors"], 0)
        # The source answers again: reads and hydration carry on.
        os.kill(src.proc.pid, signal.SIGCONT)
        self.assertEqual(h.pread(RS, 30 * MiB), want[30 * MiB:30 * MiB + RS])
        self.finish_and_check(h, c, want, src_path)

    def test_stop_while_source_hangs(self):
        src_path, _ = self.random_file(16 * MiB, seed=9)
        src = self.server("source", ["--threads=1", "file", src_path])
        # Slow enough that no worker's sweep reaches the read below.
        # (64K batches: at that rate a hydration read is in flight at the
        # hang most of the time, and the stop abandons it too.)
        c = self.clone(src, hydrate="false", hydrate_rate="256K",
                       hydrate_batch="64K", source_timeout="30")
        h = c.connect()
        h.pread(RS, 0)
        cli("resume", self.meta)
        self.status_becomes(state="hydrating")
        # Every thread of the source stopped before the read: a read that
        # still gets data then is one the stop answered wrongly.
        self.cleanups.append(src.freeze())
        t, result = background_read(c, 16 * MiB - RS)
        time.sleep(1)
        st = status(self.meta)
        h.shutdown()
        took = c.stop()
        t.join(5)
        self.assertFalse(t.is_alive())
        self.assertNotIn("data", result, "the hung read had data; status "
                         "before the stop: %s" % st)
        # Not the 30 s source-timeout.
        self.assert_prompt(took, PROMPT, "SIGTERM to exit, source hung")


class GracefulStopTest(CloneTest):
    """SIGTERM with clients attached, one idle and one writing, while
    hydration runs: the server answers what it has, commits, releases the
    lock and exits promptly, and every acknowledged write is there."""

    def test_sigterm_with_attached_clients(self):
        size = 64 * MiB
        src_path, data = self.random_file(size, seed=10)
        model = bytearray(data)
        src = self.source_file(src_path)
        c = self.clone(src, hydrate_rate="8M")
        idle = c.connect()
        idle.pread(RS, 0)
        rnd = random.Random(10)
        acked = {}          # offset -> data of the last acknowledged write
        unacked = {}        # offset -> data of a write that got no answer
        stop = threading.Event()
        done = threading.Event()

        def writer():
            h = c.connect()
            try:
                while not stop.is_set():
                    off = rnd.randrange(0, size // 4096) * 4096
                    data = rnd.randbytes(4096)
                    unacked[off] = data
                    h.pwrite(data, off)
                    acked[off] = data
                    del unacked[off]
                    if rnd.random() < 0.2:
                        h.flush()
            except Exception:
                pass                    # the server went away
            done.set()
        t = threading.Thread(target=writer, daemon=True)
        t.start()
        wait_for(lambda: len(acked) > 200, 20, "writes")
        self.assertEqual(status(self.meta)["state"], "hydrating")
        took = c.stop(signal.SIGTERM)
        print("SIGTERM to exit, 2 clients attached, hydrating: %.3f s" % took)
        stop.set()
        t.join(10)
        self.assertTrue(done.is_set())
        out = c.output()
        self.assertIn("metadata committed and unlocked", out)
        self.assertIn("disconnected 2 client connection(s)", out)
        self.assert_prompt(took, PROMPT, "SIGTERM to exit, 2 clients attached")
        st = status(self.meta)
        self.assertEqual(st["state"], "stopped")
        # Every acknowledged write is there, flushed or not: the last
        # commit covered every answered request.
        c2 = self.clone(src, name="clone2", hydrate_rate="0")
        h = c2.connect()
        for off, data in acked.items():
            got = h.pread(4096, off)
            if off in unacked:
                self.assertIn(got, (data, unacked[off]), off)
            else:
                self.assertEqual(got, data, off)
            model[off:off + 4096] = got
        for off, data in unacked.items():
            if off not in acked:
                got = h.pread(4096, off)
                self.assertIn(got, (data, bytes(model[off:off + 4096])), off)
                model[off:off + 4096] = got
        self.wait_complete(60)
        self.assertEqual(read_all(h), bytes(model))
        h.shutdown()
        idle_gone = False
        try:
            idle.pread(RS, 0)
        except Exception:
            idle_gone = True
        self.assertTrue(idle_gone)


if __name__ == "__main__":
    main()
