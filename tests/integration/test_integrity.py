"""Integration: integrity at the edges (issue 10).

- A failed dest sync is sticky: the clone enters its failed mode for good
  (no commit, FLUSH and FUA fail with EIO, reads go on, hydration stops,
  status says "failed" with the cause), and a restart reads what was not
  committed before the error from the source again.
- A dest that cannot take writes (full, or failing with EIO) never fails
  a read the source can serve; client writes on a full dest fail with
  ENOSPC; once dest takes writes again, hydration completes by itself.
- The written bitmap stays exact after completion: verify passes on a
  clone whose only differences are a client's writes.
- A zero that must not leave a hole (NO_HOLE) allocates on dest.

Dest faults come from tests/integration/failio.c (LD_PRELOAD) and from a
small tmpfs."""
import json
import os
import subprocess
import time

import nbd

from harness import (CloneTest, SANITIZER_ENV, cli, main, read_all, sha,
                     status, wait_for)

MiB = 1 << 20
RS = 64 * 1024


def expect_error(test, errno_name, fn, *args):
    with test.assertRaises(nbd.Error) as e:
        fn(*args)
    test.assertEqual(e.exception.errno, errno_name, str(e.exception))


class IntegrityTest(CloneTest):

    def unhydrated_ranges(self):
        lines = cli("inspect", "--map", self.meta).stdout.splitlines()
        return [tuple(map(int, l.split())) for l in lines if l[:1].isdigit()]

    def committed(self, off):
        return not any(o <= off < o + n for o, n in self.unhydrated_ranges())

    def test_failed_sync_is_sticky(self):
        src_path, source = self.random_file(16 * MiB, seed=31)
        src = self.source_file(src_path)
        c = self.failio_clone(src, hydrate="false")
        h = c.connect()
        a, b = os.urandom(RS), os.urandom(RS)
        h.pwrite(a, 0)                        # region 0: written, flushed
        h.flush()
        self.assertTrue(self.committed(0))
        open(self.sync_trigger, "w").close()
        h.pwrite(b, MiB)                      # region 16: written, never durable
        expect_error(self, "EIO", h.flush)
        os.unlink(self.sync_trigger)          # the disk "recovers"
        # The kernel would report the lost writeback once: the next sync
        # succeeds, and must not be trusted.  Sticky: every flush fails.
        expect_error(self, "EIO", h.flush)
        expect_error(self, "EIO", h.pwrite, b"f" * 4096, 2 * MiB, nbd.CMD_FLAG_FUA)
        st = self.status_becomes(state="failed")
        self.assertIn("fdatasync", st["last_error"])
        self.assertIn(self.dest, st["last_error"])
        # Reads go on: hydrated regions from dest, the rest from the source.
        self.assertEqual(h.pread(RS, 0), a)
        self.assertEqual(h.pread(RS, MiB), b)
        self.assertEqual(h.pread(RS, 8 * MiB), source[8 * MiB:8 * MiB + RS])
        # Hydration stays stopped, whatever the CLI says.
        cli("resume", self.meta)
        time.sleep(1.5)
        st2 = status(self.meta)
        self.assertEqual(st2["state"], "failed")
        self.assertEqual(st2["bytes_copied"], st["bytes_copied"])
        self.assertEqual(c.output().count("failed: dest"), 1, c.output())
        # Nothing was committed after the error.
        self.assertFalse(self.committed(MiB))
        self.assertFalse(self.committed(8 * MiB))
        p = cli("wait", "--timeout", "5", self.meta, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("failed", p.stderr)
        h.shutdown()
        c.stop()
        # Restart: what was not committed reads from the source again;
        # what was flushed before the error is there.
        c2 = self.clone(src, name="clone2", hydrate="false")
        h2 = c2.connect()
        self.assertEqual(h2.pread(RS, 0), a)
        self.assertEqual(h2.pread(RS, MiB), source[MiB:MiB + RS])
        h2.flush()
        model = bytearray(source)
        model[0:RS] = a
        cli("resume", self.meta)
        self.wait_complete(60)
        self.assertEqual(read_all(h2), bytes(model))
        h2.shutdown()

    def test_failed_mode_distrusts_uncommitted_copies(self):
        """A region copied after the last good commit may have lost its
        pages with the failed sync (the kernel drops what it could not
        write): in failed mode it is read from the source, and a partial
        write to it is merged with the source's data.  The drop is
        simulated by overwriting those bytes of dest behind the server."""
        src_path, source = self.random_file(8 * MiB, seed=37)
        src = self.source_file(src_path)
        c = self.failio_clone(src, hydrate="false")
        h = c.connect()
        h.flush()
        x, y = 2 * MiB, 5 * MiB
        self.assertEqual(h.pread(RS, x), source[x:x + RS])     # copied
        self.assertEqual(h.pread(RS, y), source[y:y + RS])     # copied
        open(self.sync_trigger, "w").close()
        expect_error(self, "EIO", h.flush)
        os.unlink(self.sync_trigger)
        with open(self.dest, "r+b") as f:                       # "dropped"
            for off in (x, y):
                f.seek(off)
                f.write(bytes(RS))
            f.flush()
            os.fsync(f.fileno())
        self.assertEqual(h.pread(RS, x), source[x:x + RS])
        h.pwrite(b"p" * 100, y + 1000)
        want = bytearray(source[y:y + RS])
        want[1000:1100] = b"p" * 100
        self.assertEqual(h.pread(RS, y), bytes(want))
        h.shutdown()

    def test_verify_after_kill_with_unflushed_write(self):
        """A write that reached dest but not a commit before the server
        was killed is still known as written: verify does not call it a
        bad copy."""
        src_path, source = self.random_file(4 * MiB, seed=38)
        src = self.source_file(src_path)
        c = self.clone(src)
        self.wait_complete(60)
        h = c.connect()
        h.pwrite(b"\x5a" * 4096, 3 * MiB)         # no flush
        import signal
        c.stop(signal.SIGKILL)
        v = cli("verify", "--json", self.meta, "--source", src.uri, "--dest",
                self.dest, check=False)
        out = json.loads(v.stdout)
        self.assertEqual((v.returncode, out["mismatched"]), (0, 0), v.stdout)
        self.assertEqual(out["written"], 1, out)

    def test_failed_sync_after_completion(self):
        src_path, source = self.random_file(4 * MiB, seed=32)
        src = self.source_file(src_path)
        c = self.failio_clone(src)
        self.wait_complete(60)
        h = c.connect()
        h.pwrite(b"x" * 4096, 0)
        h.flush()
        open(self.sync_trigger, "w").close()
        h.pwrite(b"y" * 4096, 0)
        expect_error(self, "EIO", h.flush)
        os.unlink(self.sync_trigger)
        expect_error(self, "EIO", h.flush)
        self.status_becomes(state="failed")
        self.assertEqual(h.pread(4096, 0), b"y" * 4096)
        h.shutdown()

    def test_copy_on_read_survives_failing_dest_writes(self):
        src_path, source = self.random_file(8 * MiB, seed=33)
        src = self.source_file(src_path)
        c = self.failio_clone(src, hydrate="false")
        h = c.connect()
        open(self.write_trigger, "w").close()
        for off in range(0, 8 * MiB, MiB):
            self.assertEqual(h.pread(MiB, off), source[off:off + MiB], off)
        st = wait_for(lambda: (lambda s: s["errors"] > 0 and s)(status(self.meta)),
                      5, "the dest errors counted")
        self.assertEqual(st["hydrated"], 0)
        self.assertIn("dest", st["last_error"])
        # A client write the dest refuses fails, and says why.
        expect_error(self, "EIO", h.pwrite, b"w" * RS, 2 * MiB)
        os.unlink(self.write_trigger)
        # Dest heals: hydration completes by itself.
        cli("resume", self.meta)
        self.wait_complete(60)
        self.assertEqual(read_all(h), source)
        h.shutdown()
        c.stop()
        self.assertEqual(sha(self.dest), sha(src_path))

    def test_full_dest(self):
        if os.geteuid() != 0:
            self.skipTest("mounting a tmpfs needs root")
        mnt = os.path.join(self.tmp, "small")
        os.makedirs(mnt)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", mnt],
                       check=True, timeout=30)
        self.cleanups.append(lambda: subprocess.run(["umount", "-l", mnt], timeout=30))
        self.dest = os.path.join(mnt, "dest.img")
        src_path, source = self.random_file(16 * MiB, seed=34)
        src = self.source_file(src_path)
        c = self.clone(src, hydrate="false")
        h = c.connect()
        model = bytearray(source)
        kept = os.urandom(RS)
        h.pwrite(kept, 0)                     # acknowledged and flushed
        h.flush()
        model[0:RS] = kept
        # 16 MiB of reads through a 4 MiB dest: every one served.
        for off in range(0, 16 * MiB, MiB):
            self.assertEqual(h.pread(MiB, off), bytes(model[off:off + MiB]), off)
        st = wait_for(lambda: (lambda s: s["errors"] > 0 and s)(status(self.meta)),
                      5, "the dest errors counted")
        self.assertLess(st["hydrated"], st["regions"])
        # A write the dest has no room for: ENOSPC, not EIO, not a hang.
        unhydrated = [o for o, n in self.unhydrated_ranges() if o >= MiB]
        self.assertTrue(unhydrated)
        expect_error(self, "ENOSPC", h.pwrite, b"z" * RS, unhydrated[-1] // RS * RS)
        h.flush()                              # nothing failed to sync
        self.assertEqual(h.pread(RS, 0), kept)
        # Room again: hydration completes by itself, nothing lost.
        subprocess.run(["mount", "-o", "remount,size=64M", mnt], check=True, timeout=30)
        cli("resume", self.meta)
        self.wait_complete(60)
        self.assertEqual(read_all(h), bytes(model))
        h.shutdown()
        c.stop()
        self.assertEqual(sha(self.dest), sha(bytes(model)))

    def test_verify_after_completion_sees_only_client_writes(self):
        src_path, source = self.random_file(16 * MiB, seed=35)
        src = self.source_file(src_path)
        c = self.clone(src)
        self.wait_complete(60)
        h = c.connect()
        h.pwrite(os.urandom(RS), MiB)          # after completion
        h.pwrite(os.urandom(100), 5 * MiB + 7)  # partial region
        h.zero(2 * RS, 9 * MiB)
        h.flush()
        h.shutdown()
        c.stop()
        v = cli("verify", "--json", self.meta, "--source", src.uri, "--dest",
                self.dest, check=False)
        out = json.loads(v.stdout)
        self.assertEqual((v.returncode, out["mismatched"]), (0, 0), v.stdout)
        self.assertEqual(out["written"], 1 + 1 + 2, out)
        # A corrupted copied region is still found.
        with open(self.dest, "r+b") as f:
            f.seek(12 * MiB)
            f.write(b"\xff" * 16)
        v = cli("verify", "--json", self.meta, "--source", src.uri, "--dest",
                self.dest, check=False)
        self.assertEqual(v.returncode, 1)
        self.assertEqual(json.loads(v.stdout)["mismatched"], 1)

    def test_zero_no_hole_allocates(self):
        src_path, source = self.random_file(8 * MiB, seed=36)
        src = self.source_file(src_path)
        c = self.clone(src, hydrate="false")
        h = c.connect()
        before = os.stat(self.dest).st_blocks * 512
        h.zero(4 * RS, 8 * RS, nbd.CMD_FLAG_NO_HOLE)     # must allocate
        h.trim(4 * RS, 32 * RS)                          # may stay a hole
        h.flush()
        self.assertEqual(h.pread(4 * RS, 8 * RS), bytes(4 * RS))
        self.assertEqual(h.pread(4 * RS, 32 * RS), bytes(4 * RS))
        grown = os.stat(self.dest).st_blocks * 512 - before
        self.assertGreaterEqual(grown, 4 * RS, "NO_HOLE zero left a hole")
        self.assertLess(grown, 8 * RS, "the trim allocated too")
        h.shutdown()


if __name__ == "__main__":
    main()
