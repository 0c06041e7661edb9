"""Integration: a clone into a dest that already holds data (a reused
disk or file).  aclone did not create such a dest, so it must not assume
that its unhydrated regions read zero: regions the source reports as zero
and regions a client zeroes or trims must be zeroed on dest, never left
with the old bytes.  The source is sparse, so the zero scan has work."""
import os

import nbd

from harness import (CloneTest, cli, main, read_all, sha, status,
                     write_random_file)

MiB = 1 << 20
RS = 64 * 1024
SIZE = 32 * MiB
DATA_EVERY = 4                     # data in MiB 0, 4, 8, ...; holes elsewhere
ZERO_BYTES = SIZE - SIZE // DATA_EVERY


class ReusedDestTest(CloneTest):

    def setUp(self):
        super().setUp()
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, SIZE, seed=5,
                          sparse_chunks=(MiB, DATA_EVERY))
        with open(self.src_path, "rb") as f:
            self.model = bytearray(f.read())
        # Old data everywhere, so that a byte left over reads as non-zero.
        write_random_file(self.dest, SIZE, seed=6)
        with open(self.dest, "rb") as f:
            old = f.read(MiB)
        self.assertNotIn(bytes(4096), old)
        self.src = self.source_file(self.src_path)

    def zero_areas(self):
        """(offset, length) of the source's holes: MiB 1-3, 5-7, ..."""
        return [(m * MiB, MiB) for m in range(SIZE // MiB) if m % DATA_EVERY]

    def assert_not_known_zero(self):
        """The header never claims dest reads zero (flag dest-zero)."""
        self.assertNotIn("dest-zero", cli("inspect", self.meta).stdout)

    def test_hydrates_to_the_source(self):
        # The zero scan and the copy over old data: dest ends up exactly
        # the source, the old bytes in its holes zeroed.
        c = self.clone(self.src)
        self.wait_complete(60)
        st = status(self.meta)
        self.assertEqual(st["bytes_skipped"], ZERO_BYTES)   # the zero scan ran
        self.assertEqual(st["bytes_copied"], SIZE - ZERO_BYTES)
        h = c.connect()
        self.assertEqual(sha(read_all(h)), sha(self.src_path))
        h.shutdown()
        c.stop()
        self.assertEqual(sha(self.dest), sha(self.src_path))

    def test_zero_areas_read_zero_before_completion(self):
        # Rate-limited so that the copy is far from done while the zero
        # scan (not rate-limited) has marked every hole hydrated: reads
        # of the holes then come from dest, and must be the source's
        # zeroes, not the old bytes.
        c = self.clone(self.src, hydrate_rate="64K")
        self.status_becomes(timeout=30, bytes_skipped=ZERO_BYTES)
        self.assertNotEqual(status(self.meta)["state"], "complete")
        h = c.connect()
        for off, n in self.zero_areas():
            self.assertEqual(h.pread(n, off), bytes(n), "hole at %d" % off)
        self.assertEqual(read_all(h), bytes(self.model))
        h.shutdown()
        c.stop()
        self.assert_not_known_zero()

    def test_trim_and_zero_of_unhydrated_regions(self):
        # Hydration off: every region starts unhydrated with old bytes on
        # dest.  Whole-region trim, zero (with and without NO_HOLE) and
        # fast zero hydrate without copying, and must zero dest.  No
        # copy-on-read either, so that only the zeroed regions are
        # hydrated when the server restarts: the restart must take them
        # from the committed bitmap.
        c = self.clone(self.src, hydrate="false", copy_on_read="false")
        h = c.connect()
        ops = [
            (lambda n, off: h.trim(n, off), 4 * MiB, 4 * RS),         # data
            (lambda n, off: h.zero(n, off), 8 * MiB + RS, 2 * RS),    # data
            (lambda n, off: h.zero(n, off, nbd.CMD_FLAG_NO_HOLE),
             12 * MiB, 3 * RS),                                        # data
            (lambda n, off: h.zero(n, off, nbd.CMD_FLAG_FAST_ZERO),
             16 * MiB + 5 * RS, RS),                                   # data
            (lambda n, off: h.trim(n, off), 1 * MiB, 2 * RS),         # hole
            (lambda n, off: h.zero(n, off, nbd.CMD_FLAG_NO_HOLE),
             2 * MiB + 7 * RS, RS),                                    # hole
        ]
        for op, off, n in ops:
            op(n, off)
            self.model[off:off + n] = bytes(n)
            self.assertEqual(h.pread(n, off), bytes(n), "zeroed at %d" % off)
        h.flush()                      # commits, publishes the counters
        st = status(self.meta)
        self.assertEqual(st["bytes_copied"], 0)      # hydrated without a copy
        hydrated = sum(n for _, _, n in ops) // RS
        self.assertEqual(st["hydrated"], hydrated)
        self.assertEqual(read_all(h), bytes(self.model))
        h.shutdown()
        c.stop()
        self.assertEqual(status(self.meta)["hydrated"], hydrated)
        self.assert_not_known_zero()
        # After a restart (committed state, dest as left) and hydration.
        c2 = self.clone(self.src, name="clone2")
        self.wait_complete(60)
        h = c2.connect()
        self.assertEqual(read_all(h), bytes(self.model))
        h.shutdown()
        c2.stop()
        self.assertEqual(sha(self.dest), sha(bytes(self.model)))


if __name__ == "__main__":
    main()
