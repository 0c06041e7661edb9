"""Integration: background hydration (issue 3): complete and exact,
sparse-aware, steerable (pause, resume, rate, depth), local after a read
miss, and the clone outlives its source once complete."""
import os
import subprocess
import time

from harness import (CloneTest, cli, main, read_all, sha, status, wait_for,
                     write_random_file)

MiB = 1 << 20
RS = 64 * 1024


def peak_reads(log, after=0):
    """From an nbdkit log filter's file: (most reads in flight at once,
    reads begun), counting only reads begun after the first `after`."""
    begun = peak = 0
    open_ids = set()
    try:
        with open(log) as f:
            lines = f.readlines()
    except OSError:
        return 0, 0
    for line in lines:
        words = line.split()
        if len(words) < 5 or not words[2].startswith("connection="):
            continue
        if words[3] == "Read":
            begun += 1
            if begun > after:
                open_ids.add((words[2], words[4]))
                peak = max(peak, len(open_ids))
        elif words[3] == "...Read":
            open_ids.discard((words[2], words[4]))
    return peak, begun


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

    def quiet(self, timeout=30):
        """Wait until two successive live-page updates show the same
        bytes_copied (copies in flight have landed); returns that count."""
        last = [None]

        def same():
            st = status(self.meta)
            prev, last[0] = last[0], (st["updated"], st["bytes_copied"])
            return (prev is not None and prev[0] != st["updated"]
                    and prev[1] == st["bytes_copied"])
        wait_for(same, timeout, "copying to stop", interval=0.5)
        return last[0][1]

    def progress(self, timeout=30):
        """Wait until bytes_copied grows (a hang bound, not a speed)."""
        a = status(self.meta)["bytes_copied"]
        wait_for(lambda: status(self.meta)["bytes_copied"] > a, timeout,
                 "hydration to make progress", interval=0.1)

    def test_pause_resume(self):
        src = self.random_source(64 * MiB)
        c = self.clone(src, hydrate="false", hydrate_rate="8M")
        self.status_becomes(state="paused")
        self.assertEqual(copied_after(self.meta, 1.5), 0)
        cli("resume", self.meta)
        self.status_becomes(state="hydrating")
        self.progress()
        cli("pause", self.meta)
        self.status_becomes(state="paused")
        self.quiet()                         # batches in flight finish
        self.assertEqual(copied_after(self.meta, 1.5), 0)
        cli("resume", self.meta)
        cli("set", self.meta, "rate=0")
        self.wait_complete(60)
        c.stop()
        self.assertEqual(sha(self.dest), sha(self.src_path))

    def test_rate_limit_and_set(self):
        """The limit is an upper bound, which no load can break (a loaded
        machine only copies slower): over a window of t seconds at most
        rate * (t + 1) bytes (the bucket holds one second's worth) plus the
        batches in flight.  Unlimited, 128 MiB copies in about a second."""
        src = self.random_source(128 * MiB)
        self.clone(src, hydrate_rate="4M")
        slack = 8 * MiB                      # batches admitted on credit
        for rate, name, seconds in ((4 * MiB, "4M", 4), (512 * 1024, "512K", 6)):
            if name != "4M":
                cli("set", self.meta, "rate=" + name)
                time.sleep(1.5)              # batches begun before it land
            a = status(self.meta)
            time.sleep(seconds)
            wait_for(lambda: status(self.meta)["updated"] > a["updated"] + seconds - 0.5,
                     10, "live page update")
            b = status(self.meta)
            if name == "4M":                 # a second's rate: 0 at 512K/s
                self.assertGreater(b["eta_seconds"], 0)
            t = b["updated"] - a["updated"]
            copied = b["bytes_copied"] - a["bytes_copied"]
            self.assertLessEqual(copied, rate * (t + 1) + slack,
                                 "rate=%s: %d bytes in %.1f s" % (name, copied, t))
            self.assertLessEqual(b["rate"], 2 * rate + slack)
            self.assertNotEqual(b["state"], "complete")
        # Lifted: the rest copies, exactly.
        cli("set", self.meta, "rate=0")
        self.wait_complete(60)

    def test_depth(self):
        """hydrate-depth bounds the source reads in flight, and `aclone set
        depth=` changes it live.  Observed at the source: a log filter
        records every read's start and end (each takes 50 ms, so a depth
        that allows more is soon used)."""
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, 256 * MiB, seed=1)
        log = os.path.join(self.tmp, "source-requests.log")
        src = self.source_file(self.src_path, filters=["log", "delay"],
                               extra=["logfile=" + log, "rdelay=50ms"])
        self.clone(src, hydrate_depth="1", hydrate_batch="256K")
        wait_for(lambda: peak_reads(log)[1] >= 20, 60, "20 reads at depth 1")
        peak1, n1 = peak_reads(log)
        self.assertEqual(peak1, 1, "depth 1 let %d reads run at once" % peak1)
        cli("set", self.meta, "depth=8")
        wait_for(lambda: peak_reads(log, after=n1)[0] >= 8, 60,
                 "8 reads at once after set depth=8")
        cli("set", self.meta, "depth=3")
        time.sleep(1)                        # reads begun at depth 8 end
        start = peak_reads(log)[1]
        wait_for(lambda: peak_reads(log, after=start)[1] >= 30, 60,
                 "30 reads at depth 3")
        peak3, _ = peak_reads(log, after=start)
        self.assertLessEqual(peak3, 3, "depth 3 let %d reads run at once" % peak3)
        self.assertEqual(peak_reads(log)[0], 8, "never more than depth 8")

    def test_window_bytes_capped_on_a_near_source(self):
        """On a near source (twice the bandwidth-delay product below
        4 MiB) hydration keeps at most 4 MiB in flight, in batches of
        256 KiB: a window of 1 MiB batches would grow towards the hard
        depth, 32 MiB of buffers that copy no faster.  (The rate limit
        keeps the copy short of the disk; the window still grows, one
        batch per window of reads.)"""
        src = self.server("source", ["pattern", "size=1G"])
        self.clone(src, hydrate_rate="64M")
        wait_for(lambda: status(self.meta)["bytes_copied"] > 0, 30, "a copy")
        peak, end = 0, time.monotonic() + 3
        while time.monotonic() < end:
            peak = max(peak, status(self.meta)["foreground"]["window"])
            time.sleep(0.02)
        st = status(self.meta)
        self.assertEqual(st["state"], "hydrating")
        self.assertGreater(st["bytes_copied"], 32 * MiB, "too few reads to judge")
        self.assertGreater(peak, 0)
        self.assertLessEqual(peak, 4 * MiB, "window %d bytes on a near source" % peak)
        wait_for(lambda: status(self.meta)["foreground"]["limited_by"] == "inflight",
                 30, "status to say the bytes in flight bind")

    def test_window_bytes_follow_a_far_source(self):
        """On a far source (each read 100 ms) 4 MiB in flight would hold
        the copy at 40 MB/s: the cap follows twice the bandwidth-delay
        product, so the window grows past 4 MiB, up to the hard depth."""
        src = self.server("source", ["--filter=delay", "pattern", "size=4G",
                                     "rdelay=100ms"])
        self.clone(src, hydrate_depth="32")
        wait_for(lambda: status(self.meta)["foreground"]["window"] > 4 * MiB, 30,
                 "the window to grow past 4 MiB")
        self.assertLessEqual(status(self.meta)["foreground"]["window"], 32 * MiB)

    def test_locality_after_read_miss(self):
        """After a read miss, the regions that follow it are copied next:
        at 2M/s, the sweep would reach them only after about 36 s (the
        second worker's home range starts at 128 MiB); with locality they
        come within seconds.  The bound is far from both.  What follows
        is 4 MiB, whatever the batches: eight of them (128K, halved
        while a client reads) would stop short of 2 MiB."""
        src = self.random_source(256 * MiB)
        c = self.clone(src, hydrate_rate="2M", hydrate_batch="128K")
        h = c.connect()
        miss = 200 * MiB
        h.pread(4096, miss)

        def hydrated(off):
            h.flush()                        # the map reads committed bits
            lines = cli("inspect", "--map", self.meta).stdout.splitlines()
            holes = [tuple(map(int, l.split())) for l in lines if l[:1].isdigit()]
            return not any(o <= off < o + n for o, n in holes)
        # The miss's own region lands behind the reply (copy-on-read
        # write-behind): soon, but not necessarily by the first flush.
        wait_for(lambda: hydrated(miss), 15, "the missed region to be copied",
                 interval=0.2)
        wait_for(lambda: hydrated(miss + RS) and hydrated(miss + 2 * MiB), 15,
                 "the regions after the miss to be copied next", interval=0.5)
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
