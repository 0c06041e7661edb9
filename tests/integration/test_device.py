"""Integration: the clone device's NBD semantics with real servers and
clients (issue 2).  Hydration is off (hydrate=false) where a test needs
regions to stay unhydrated, so that the foreground paths are exercised."""
import os
import re
import signal
import subprocess
import time

import nbd

from harness import (CloneTest, cli, main, read_all, sha, status,
                     write_random_file, PLUGIN, PROMPT, SANITIZER_ENV)

MiB = 1 << 20
RS = 64 * 1024


class DeviceTest(CloneTest):

    def make_source(self, size=16 * MiB, seed=1, sparse=None):
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, size, seed, sparse)
        return self.source_file(self.src_path)

    def test_reads_match_source_and_copy_on_read(self):
        src = self.make_source()
        c = self.clone(src, hydrate="false")
        h = c.connect()
        self.assertEqual(h.get_size(), 16 * MiB)
        with open(self.src_path, "rb") as f:
            model = f.read()
        # Unaligned reads spanning regions.
        for off, n in [(0, 1), (RS - 3, 10), (5 * RS + 7, 3 * RS + 11),
                       (16 * MiB - 100, 100)]:
            self.assertEqual(h.pread(n, off), model[off:off + n])
        # regions 0,1 ; 5..8 ; last: copy-on-read hydrated whole regions
        self.status_becomes(hydrated=2 + 4 + 1, bytes_copied=7 * RS)
        # All of it, through nbdcopy.
        out = os.path.join(self.tmp, "out.img")
        subprocess.run(["nbdcopy", c.uri, out], check=True, timeout=120)
        self.assertEqual(sha(out), sha(self.src_path))
        h.shutdown()

    def test_no_copy_on_read(self):
        src = self.make_source()
        c = self.clone(src, hydrate="false", copy_on_read="false")
        h = c.connect()
        with open(self.src_path, "rb") as f:
            model = f.read()
        self.assertEqual(h.pread(3 * RS, RS // 2), model[RS // 2:RS // 2 + 3 * RS])
        time.sleep(1.2)
        self.status_becomes(hydrated=0, bytes_copied=0)
        h.shutdown()

    def test_write_trim_zero_cache_against_model(self):
        src = self.make_source()
        c = self.clone(src, hydrate="false")
        h = c.connect()
        with open(self.src_path, "rb") as f:
            model = bytearray(f.read())
        self.assertTrue(h.can_fua() and h.can_trim() and h.can_zero()
                        and h.can_fast_zero() and h.can_cache()
                        and h.can_multi_conn() and h.can_flush())

        # Whole unhydrated regions: no copy.
        data = os.urandom(2 * RS)
        h.pwrite(data, 4 * RS)
        model[4 * RS:6 * RS] = data
        self.status_becomes(hydrated=2, bytes_copied=0, bytes_skipped=2 * RS)
        # Partial region: read-modify-write.
        h.pwrite(b"x" * 100, 10 * RS + 5, nbd.CMD_FLAG_FUA)
        model[10 * RS + 5:10 * RS + 105] = b"x" * 100
        self.status_becomes(hydrated=3, bytes_copied=RS)
        # Zero whole regions (no hole), trim partial, fast zero refused on
        # a partial unhydrated region.
        h.zero(2 * RS, 20 * RS, nbd.CMD_FLAG_NO_HOLE)
        model[20 * RS:22 * RS] = bytes(2 * RS)
        h.trim(1000, 30 * RS + 100)
        model[30 * RS + 100:30 * RS + 1100] = bytes(1000)
        with self.assertRaises(nbd.Error) as e:
            h.zero(100, 40 * RS + 1, nbd.CMD_FLAG_FAST_ZERO)
        self.assertIn(e.exception.errno, ("ENOTSUP", "EOPNOTSUPP"))
        # Cache hydrates.  (Both counters named: the live page is one
        # snapshot of counters updated one after the other.)
        self.status_becomes(hydrated=6, bytes_copied=2 * RS)
        h.cache(3 * RS, 50 * RS)
        self.status_becomes(hydrated=9, bytes_copied=5 * RS)
        h.flush()
        self.assertEqual(read_all(h), bytes(model))
        h.shutdown()
        # A second connection sees the same device.
        h2 = c.connect()
        self.assertEqual(read_all(h2), bytes(model))
        h2.shutdown()

    def test_flushed_writes_survive_kill9(self):
        src = self.make_source()
        c = self.clone(src, hydrate="false")
        h = c.connect()
        with open(self.src_path, "rb") as f:
            model = bytearray(f.read())
        for i in range(20):
            off = i * 97 * 1000
            d = os.urandom(5000)
            h.pwrite(d, off)
            model[off:off + 5000] = d
        h.flush()
        c.stop(signal.SIGKILL)
        c2 = self.clone(src, name="clone2", hydrate="false")
        h2 = c2.connect()
        self.assertEqual(read_all(h2), bytes(model))
        h2.shutdown()

    def test_restart_resumes_and_keeps_hydrated_regions(self):
        src = self.make_source()
        c = self.clone(src, hydrate="false")
        h = c.connect()
        with open(self.src_path, "rb") as f:
            old = f.read()
        h.pread(RS, 0)                       # region 0: copied
        d = os.urandom(RS)
        h.pwrite(d, 3 * RS)                  # region 3: written
        h.shutdown()
        self.assert_prompt(c.stop(), PROMPT, "SIGTERM to exit")
        self.assertEqual(status(self.meta)["state"], "stopped")
        # The source changes everywhere.
        src.stop()
        write_random_file(self.src_path, 16 * MiB, seed=2)
        with open(self.src_path, "rb") as f:
            new = f.read()
        src2 = self.source_file(self.src_path, name="source2")
        c2 = self.clone(src2, name="clone2", hydrate="false")
        h2 = c2.connect()
        got = read_all(h2)
        self.assertEqual(got[0:RS], old[0:RS])
        self.assertEqual(got[3 * RS:4 * RS], d)
        self.assertEqual(got[RS:3 * RS], new[RS:3 * RS])
        self.assertEqual(got[4 * RS:], new[4 * RS:])
        h2.shutdown()

    def test_extents(self):
        # Data in every 4th MiB, holes elsewhere.
        src = self.make_source(sparse=(MiB, 4))
        c = self.clone(src, hydrate="false")
        h = c.connect()
        self.assertTrue(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        seen = []

        def cb(meta, off, entries, err):
            for i in range(0, len(entries), 2):
                seen.append((entries[i], entries[i + 1]))
        h.block_status(4 * MiB, 0, cb)
        # MiB 0 data, MiB 1-3 zero (reported hole|zero).
        pos, kinds = 0, []
        for length, flags in seen:
            kinds.append((pos, flags & 3))
            pos += length
        self.assertEqual(kinds[0], (0, 0))
        self.assertIn((MiB, 3), kinds)
        # After a trim of a hydrated region the clone reports a hole.
        h.pwrite(os.urandom(RS), 2 * MiB)
        h.trim(RS, 2 * MiB)
        seen.clear()
        h.block_status(RS, 2 * MiB, cb)
        self.assertEqual(seen[0][1] & 3, 3)
        # nbdinfo --map agrees about the total.
        p = subprocess.run(["nbdinfo", "--map", "--totals", c.uri], capture_output=True,
                           text=True, check=True, timeout=60)
        self.assertIn("data", p.stdout)
        h.shutdown()

    def test_qemu_img_and_qemu_io(self):
        src = self.make_source()
        c = self.clone(src)
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                            c.uri, self.src_path], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        p = subprocess.run(["qemu-io", "-f", "raw", c.uri,
                            "-c", "write -P 0xab 1M 64k",
                            "-c", "write -P 0xcd 3000 5000",
                            "-c", "read -P 0xab 1M 64k",
                            "-c", "read -P 0xcd 3000 5000",
                            "-c", "flush"], capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertNotIn("Pattern verification failed", p.stdout)
        self.assertNotIn("fail", p.stdout.lower())
        p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                            c.uri, self.src_path], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(p.returncode, 1, "clone must now differ from source")

    def test_status_inspect_and_lock(self):
        src = self.make_source()
        c = self.clone(src, hydrate="false")
        st = self.status_becomes(state="paused")
        for k in ("size", "block_size", "regions", "hydrated", "bytes_copied",
                  "bytes_skipped", "state", "pid", "errors", "last_error",
                  "rate", "eta_seconds"):
            self.assertIn(k, st)
        self.assertEqual(st["size"], 16 * MiB)
        self.assertEqual(st["block_size"], RS)
        self.assertEqual(st["regions"], 256)
        self.assertEqual(st["pid"], c.proc.pid)
        self.assertEqual(os.stat(self.meta).st_mode & 0o777, 0o600)
        self.assertEqual(os.stat(self.dest).st_mode & 0o777, 0o600)
        # Plain text status names the state too.
        self.assertIn("state:         paused", cli("status", self.meta).stdout)
        # A second server on the same meta is refused.
        with self.assertRaises(RuntimeError) as e:
            self.clone(src, name="clone2", dest=os.path.join(self.tmp, "d2"))
        self.assertIn("in use", str(e.exception))
        self.assertIn(self.meta, str(e.exception))
        ins = cli("inspect", "--map", self.meta).stdout
        self.assertIn("valid:         yes", ins)
        self.assertIn("in use:        yes", ins)
        self.assertIn("0 16777216", ins)            # nothing hydrated yet
        c.stop()
        self.assertEqual(status(self.meta)["state"], "stopped")

    def test_verify(self):
        src = self.make_source(seed=9)
        c = self.clone(src)
        h = c.connect()
        h.pwrite(b"w" * RS, 3 * RS)            # written: not compared
        h.flush()
        h.shutdown()
        self.wait_complete(60)
        # Verify runs while the server runs, too.
        p = cli("verify", "--json", self.meta, "--source", src.uri,
                "--dest", self.dest)
        v = __import__("json").loads(p.stdout)
        self.assertEqual(v["mismatched"], 0)
        self.assertEqual(v["written"], 1)
        self.assertEqual(v["unhydrated"], 0)
        self.assertEqual(v["compared"], 255)
        c.stop()
        # Corrupt one copied region on dest: found, named, exit 1.
        with open(self.dest, "r+b") as f:
            f.seek(100 * RS + 10)
            f.write(b"corrupt")
        p = cli("verify", self.meta, "--source", src.uri, "--dest", self.dest,
                check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("offset %d length %d" % (100 * RS, RS), p.stdout)
        self.assertIn("mismatched:    1 regions", p.stdout)
        self.assertEqual(cli("verify", check=False).returncode, 2)   # usage

    def test_garbage_live_page_is_harmless(self):
        src = self.make_source()
        c = self.clone(src, hydrate="false")
        h = c.connect()
        h.pread(RS, 0)
        h.shutdown()
        c.stop()
        import json
        import random
        import struct
        rnd = random.Random(1)
        for keep_magic in (False, True):
            page = bytearray(rnd.randbytes(4096))
            if keep_magic:
                page[0:8] = struct.pack("<Q", 0x4556494c454e4f4c)
            with open(self.meta, "r+b") as f:
                f.seek(4096)
                f.write(page)
            st = json.loads(cli("status", "--json", self.meta).stdout)
            self.assertEqual(st["state"], "stopped")
            self.assertLessEqual(st["hydrated"], st["regions"])
            self.assertNotIn("\n", st["last_error"])
            self.assertIn("valid:         yes", cli("inspect", self.meta).stdout)
            # The server starts and serves correct data regardless.
            c = self.clone(src, name="clone-%d" % keep_magic, hydrate="false",
                           hydrate_depth="4", copy_on_read="false")
            h = c.connect()
            with open(self.src_path, "rb") as f:
                self.assertEqual(read_all(h), f.read())
            h.shutdown()
            self.status_becomes(state="paused")
            c.stop()

    def test_requests_at_the_edges(self):
        src = self.make_source()
        c = self.clone(src, hydrate="false")
        h = c.connect()
        with open(self.src_path, "rb") as f:
            model = f.read()
        size = len(model)
        self.assertEqual(h.pread(1, size - 1), model[-1:])
        self.assertEqual(h.pread(RS + 2, size - RS - 2), model[-RS - 2:])
        # Past the end: refused, by nbdkit before it reaches us.
        h.set_strict_mode(0)
        for off, n in ((size, 1), (size - 1, 2)):
            with self.assertRaises(nbd.Error):
                h.pread(n, off)
        h.set_strict_mode(nbd.STRICT_COMMANDS | nbd.STRICT_BOUNDS)
        # A large request spanning many regions, unaligned at both ends.
        big = 16 * MiB - 3
        self.assertEqual(h.pread(big - 5, 3), model[3:big - 2])
        h.pwrite(b"e" * (8 * MiB + 1), RS - 1)
        h.flush()
        model = model[:RS - 1] + b"e" * (8 * MiB + 1) + model[RS + 8 * MiB:]
        self.assertEqual(read_all(h), model)
        h.shutdown()

    def test_plugin_help_and_dump(self):
        env = dict(os.environ, **SANITIZER_ENV)
        p = subprocess.run(["nbdkit", PLUGIN, "--help"], capture_output=True,
                           text=True, timeout=30, env=env)
        for k in ("source=", "dest=", "meta=", "block-size=", "copy-on-read=",
                  "hydrate-rate="):
            self.assertIn(k, p.stdout)
        helped = set(re.findall(r"^([a-z-]+)=", p.stdout, re.M))
        p = subprocess.run(["nbdkit", PLUGIN, "--dump-plugin"], capture_output=True,
                           text=True, timeout=30, env=env)
        self.assertIn("thread_model=parallel", p.stdout)
        params = re.search(r"^aclone_params=(.*)$", p.stdout, re.M).group(1).split(",")
        # One table in the plugin: --help, the man page and README list
        # the same parameters as --dump-plugin, in the same order.
        top = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
        with open(os.path.join(top, "man", "nbdkit-aclone-plugin.1")) as f:
            man = f.read()
        section = man[man.index(".SH PARAMETERS"):man.index(".SH NBD SEMANTICS")]
        with open(os.path.join(top, "README.md")) as f:
            readme = f.read()
        self.assertEqual(helped, set(params))
        self.assertEqual(re.findall(r"^\.BI ([a-z-]+)=", section, re.M), params)
        self.assertEqual(re.findall(r"^\| `([a-z-]+)=", readme, re.M), params)
        p = cli("--version")
        self.assertRegex(p.stdout, r"^aclone \d+\.\d+")
        self.assertEqual(cli("bogus", check=False).returncode, 2)
        self.assertEqual(cli("status", check=False).returncode, 2)
        self.assertEqual(cli("status", os.path.join(self.tmp, "nope"),
                             check=False).returncode, 1)


if __name__ == "__main__":
    main()
