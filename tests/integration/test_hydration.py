"""Integration: background hydration (issue 3): complete and exact,
sparse-aware, steerable (pause, resume, rate, depth), local after a read
miss, and the clone outlives its source once complete."""
import os
import subprocess
import time

from harness import (CloneTest, cli, copy_rate, main, read_all, sha, status,
                     write_random_file)

MiB = 1 << 20
RS = 64 * 1024


def copied_after(meta, seconds):
    a = status(meta)["bytes_copied"]
    time.sleep(seconds)
    return status(meta)["bytes_copied"] - a


class HydrationTest(CloneTest):

    def random_source(self, size, **kw):
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, size, seed=7, **kw)
        return self.source_file(self.src_path)

    def test_random_source_hydrates_exactly(self):
        src = self.random_source(128 * MiB)
        c = self.clone(src)
        st = self.wait_complete(60)
        st = status(self.meta)
        self.assertEqual(st["hydrated"], st["regions"])
        self.assertEqual(st["bytes_copied"], 128 * MiB)
        self.assertEqual(st["errors"], 0)
        c.stop()
        self.assertEqual(sha(self.dest), sha(self.src_path))
        self.assertIn("hydration complete", c.output())

    def test_sparse_file_source_skips_zero(self):
        # 256 MiB with data in one MiB of every 32: 8 MiB allocated.
        src = self.random_source(256 * MiB, sparse_chunks=(MiB, 32))
        c = self.clone(src)
        self.wait_complete(60)
        st = status(self.meta)
        self.assertEqual(st["bytes_copied"], 8 * MiB)
        self.assertEqual(st["bytes_skipped"], 248 * MiB)
        c.stop()
        self.assertEqual(sha(self.dest), sha(self.src_path))
        # dest stays sparse: we created it, and zero regions were not written.
        self.assertLess(os.stat(self.dest).st_blocks * 512, 16 * MiB)

    def test_source_without_block_status_is_copied_whole(self):
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, 64 * MiB, seed=7, sparse_chunks=(MiB, 8))
        src = self.source_file(self.src_path, filters=["noextents"])
        c = self.clone(src)
        self.wait_complete(60)
        st = status(self.meta)
        self.assertEqual(st["bytes_copied"], 64 * MiB)
        self.assertEqual(st["bytes_skipped"], 0)
        c.stop()
        self.assertEqual(sha(self.dest), sha(self.src_path))

    def test_failing_source_reads(self):
        # EIO on every read while the trigger file exists.
        trigger = os.path.join(self.tmp, "fail-now")
        open(trigger, "w").close()
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, 16 * MiB, seed=8)
        src = self.source_file(self.src_path, filters=["error"],
                               extra=["error-pread=EIO", "error-pread-rate=100%",
                                      "error-pread-file=" + trigger])
        c = self.clone(src)
        st = self.status_becomes(state="error")
        self.assertGreater(st["errors"], 0)
        self.assertIn("source", st["last_error"])
        self.assertEqual(st["hydrated"], 0)            # nothing marked
        h = c.connect()
        import nbd
        with self.assertRaises(nbd.Error) as e:        # client reads: EIO
            h.pread(4096, 5 * MiB)
        self.assertEqual(e.exception.errno, "EIO")
        os.unlink(trigger)                             # the source heals
        self.wait_complete(60)
        with open(self.src_path, "rb") as f:
            self.assertEqual(read_all(h), f.read())
        h.shutdown()
        c.stop()
        self.assertEqual(sha(self.dest), sha(self.src_path))

    def test_sparse_random_plugin(self):
        src = self.server("source", ["sparse-random", "size=512M", "percent=2",
                                     "runlength=1048576", "seed=42"])
        p = subprocess.run(["nbdinfo", "--map", "--totals", src.uri],
                           capture_output=True, text=True, check=True, timeout=60)
        allocated = sum(int(l.split()[0]) for l in p.stdout.splitlines()
                        if l.split()[3:4] == ["data"])
        c = self.clone(src)
        self.wait_complete(60)
        st = status(self.meta)
        # Copied: the data extents, rounded out to whole regions.
        self.assertGreaterEqual(st["bytes_copied"], allocated)
        self.assertLess(st["bytes_copied"], allocated * 1.25 + 4 * MiB)
        self.assertEqual(st["bytes_copied"] + st["bytes_skipped"], 512 * MiB)
        out = os.path.join(self.tmp, "src-copy.img")
        subprocess.run(["nbdcopy", src.uri, out], check=True, timeout=120)
        c.stop()
        self.assertEqual(sha(self.dest), sha(out))

    def test_pause_resume(self):
        src = self.random_source(64 * MiB)
        c = self.clone(src, hydrate="false", hydrate_rate="8M")
        self.status_becomes(state="paused")
        self.assertEqual(copied_after(self.meta, 1.5), 0)
        cli("resume", self.meta)
        self.status_becomes(state="hydrating")
        self.assertGreater(copied_after(self.meta, 1.5), 4 * MiB)
        cli("pause", self.meta)
        self.status_becomes(state="paused")
        time.sleep(1.2)                      # batches in flight finish
        self.assertEqual(copied_after(self.meta, 1.5), 0)
        cli("resume", self.meta)
        cli("set", self.meta, "rate=0")
        self.wait_complete(60)
        c.stop()
        self.assertEqual(sha(self.dest), sha(self.src_path))

    def test_rate_limit_and_set(self):
        src = self.random_source(128 * MiB)
        self.clone(src, hydrate_rate="4M")
        time.sleep(1.5)                      # past the first burst
        r = copy_rate(self.meta, 4)
        self.assertAlmostEqual(r / (4 * MiB), 1.0, delta=0.2)
        self.assertAlmostEqual(status(self.meta)["rate"] / (4 * MiB), 1.0, delta=0.3)
        cli("set", self.meta, "rate=12M")
        time.sleep(1.5)
        r = copy_rate(self.meta, 4)
        self.assertAlmostEqual(r / (12 * MiB), 1.0, delta=0.2)
        st = status(self.meta)
        self.assertGreater(st["eta_seconds"], 0)

    def test_depth(self):
        # Each source read takes 50 ms: throughput is proportional to depth.
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, 256 * MiB, seed=1)
        src = self.source_file(self.src_path, filters=["delay"], extra=["rdelay=50ms"])
        self.clone(src, hydrate_depth="1", hydrate_batch="256K")
        time.sleep(1)
        one = copied_after(self.meta, 3)
        cli("set", self.meta, "depth=8")
        time.sleep(1)
        eight = copied_after(self.meta, 3)
        self.assertGreater(eight, one * 3, "depth 1: %d, depth 8: %d" % (one, eight))

    def test_locality_after_read_miss(self):
        src = self.random_source(256 * MiB)
        c = self.clone(src, hydrate_rate="2M")
        h = c.connect()
        miss = 200 * MiB
        h.pread(4096, miss)
        time.sleep(2.5)
        h.flush()
        lines = cli("inspect", "--map", self.meta).stdout.splitlines()
        holes = [tuple(map(int, l.split())) for l in lines if l[:1].isdigit()]

        def hydrated(off):
            return not any(o <= off < o + n for o, n in holes)
        self.assertTrue(hydrated(miss))
        self.assertTrue(hydrated(miss + RS), "region after the miss not copied next")
        self.assertTrue(hydrated(miss + 2 * MiB), "read-ahead after the miss too short")
        h.shutdown()

    def test_complete_clone_outlives_source(self):
        src = self.random_source(32 * MiB)
        c = self.clone(src)
        p = cli("wait", "--timeout", "60", self.meta)
        self.assertIn("100.0%", p.stdout)
        st = status(self.meta)
        self.assertEqual(st["state"], "complete")
        self.assertEqual(st["eta_seconds"], 0)
        # The source connections are closed: the source stops at once.
        self.assertLess(src.stop(), 2.0)
        h = c.connect()
        with open(self.src_path, "rb") as f:
            want = f.read()
        self.assertEqual(read_all(h), want)
        h.shutdown()
        c.stop()
        # Restart without source=.
        c2 = self.clone(None, name="clone2")
        h = c2.connect()
        self.assertEqual(read_all(h), want)
        h.pwrite(b"after" * 100, 12345)
        h.flush()
        h.shutdown()

    def test_stop_mid_hydration_is_clean_for_the_source(self):
        # Stopping with copies in flight must not reset the source's
        # connections mid-reply (nbdkit 1.32 asserts and dies on that).
        src = self.random_source(256 * MiB)
        for i in range(5):
            c = self.clone(src, name="clone%d" % i, hydrate_depth="64")
            time.sleep(0.15 + 0.05 * i)
            self.assertLess(c.stop(), 3.0)
            self.servers.remove(c)
            self.assertTrue(src.alive(), "source died:\n" + src.output())
        self.assertNotIn("Assertion", src.output())
        c = self.clone(src, name="final")
        self.wait_complete(60)
        c.stop()
        self.assertEqual(sha(self.dest), sha(self.src_path))

    def test_wait_timeout_and_no_server(self):
        src = self.random_source(16 * MiB)
        c = self.clone(src, hydrate="false")
        t0 = time.monotonic()
        p = cli("wait", "--timeout", "1", self.meta, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertLess(time.monotonic() - t0, 5)
        self.assertIn("timed out", p.stderr)
        c.stop()
        p = cli("wait", self.meta, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("no server", p.stderr)
        self.assertEqual(cli("pause", self.meta, check=False).returncode, 1)


if __name__ == "__main__":
    main()
