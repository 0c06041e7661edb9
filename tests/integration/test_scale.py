"""Integration: scale (issue 13).  Memory grows by bits per region, not
bytes: a 15 TiB clone (251,658,240 regions of 64 KiB) peaks under 80 MiB
while its zero scan marks every region, and a complete clone gives its
in-core map back.  (Figures with data hydrating, and at 1 TiB, are in
tests/bench/run; this checks the bound that a regression to one byte per
region, or to the commit's old scratch arrays, would break by far.)"""
import os
import subprocess

from harness import SANITIZED, CloneTest, main, status, wait_for

TiB = 1 << 40


def memory(pid):
    """(VmHWM, VmRSS, RssAnon, RssFile) of a process, in KiB."""
    want = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k = line.split(":")[0]
            if k in want:
                out[k] = int(line.split()[1])
    return tuple(out[k] for k in want)


class ScaleTest(CloneTest):

    def test_15_tib_in_bounded_memory(self):
        if SANITIZED:
            self.skipTest("sanitizer runtimes add their own memory")
        src_path = os.path.join(self.tmp, "source.img")
        subprocess.run(["truncate", "-s", "15T", src_path], check=True)
        src = self.source_file(src_path)
        c = self.clone(src)
        wait_for(lambda: status(self.meta)["state"] == "complete", 120,
                 "a 15 TiB empty clone to complete")
        st = status(self.meta)
        self.assertEqual(st["regions"], 15 * TiB // 65536)
        self.assertEqual(st["hydrated"], st["regions"])
        hwm, rss, anon, file_ = memory(c.proc.pid)
        print("15 TiB: peak %d KiB; complete: %d KiB (anon %d, file %d)"
              % (hwm, rss, anon, file_))
        self.assertLess(hwm, 80 * 1024, "peak RSS of a 15 TiB clone")
        # The map (31.5 MiB of hydrated bits) is gone: what is left is
        # nbdkit, its libraries and our buffers.
        self.assertLess(anon, 16 * 1024, "anonymous memory of a complete clone")
        h = c.connect()
        self.assertEqual(h.pread(4096, 15 * TiB - 4096), bytes(4096))
        h.shutdown()
        # Restarted, a complete clone does not load the map either.
        c.stop()
        c2 = self.clone(src, name="clone2")
        h = c2.connect()
        self.assertEqual(h.pread(4096, 7 * TiB), bytes(4096))
        h.shutdown()
        hwm, rss, anon, file_ = memory(c2.proc.pid)
        print("15 TiB restarted complete: peak %d KiB (anon %d)" % (hwm, anon))
        self.assertLess(hwm, 24 * 1024, "peak RSS of a complete 15 TiB clone")
        self.assertLess(anon, 16 * 1024)

    def test_1_tib_hydrating_under_16_mib(self):
        """A 1 TiB clone that copies data (128 runs of 1 MiB, 8 GiB
        apart) peaks under 16 MiB: its map is 2 MiB, nbdkit and its
        libraries about 7, so the copy's buffers (at most 4 MiB in flight
        on a near source) and the commit's bitmap pages (256 KiB at a
        time) must stay small.  A window of 1 MiB batches grown to the
        hard depth, or a commit holding the whole 2 MiB bitmap, breaks
        it."""
        if SANITIZED:
            self.skipTest("sanitizer runtimes add their own memory")
        src_path = os.path.join(self.tmp, "source.img")
        runs = [(i * 8 * (1 << 30), os.urandom(1 << 20)) for i in range(128)]
        with open(src_path, "wb") as f:
            f.truncate(TiB)
            for off, data in runs:
                f.seek(off)
                f.write(data)
        src = self.source_file(src_path)
        c = self.clone(src)
        wait_for(lambda: status(self.meta)["state"] == "complete", 120,
                 "a 1 TiB clone to complete")
        st = status(self.meta)
        self.assertEqual(st["bytes_copied"], 128 << 20)
        hwm, rss, anon, file_ = memory(c.proc.pid)
        print("1 TiB hydrating: peak %d KiB; complete: %d KiB (anon %d, file %d)"
              % (hwm, rss, anon, file_))
        self.assertLess(hwm, 16 * 1024, "peak RSS of a 1 TiB clone copying data")
        # Nothing of the copy is left once complete: no map, no buffers
        # (1.3 MiB is left here; the buffers kept at the end of the sweep
        # would add 1.5 MiB or more).
        self.assertLess(anon, 2 * 1024, "anonymous memory of a complete clone")
        with open(self.dest, "rb") as f:
            for off, data in runs[::16]:
                f.seek(off)
                self.assertEqual(f.read(len(data)), data, "dest at %d" % off)


if __name__ == "__main__":
    main()
