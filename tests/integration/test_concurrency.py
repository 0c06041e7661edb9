"""Integration: several clients doing random reads, writes, trims, zeroes
and flushes at random offsets and sizes (for SECONDS, and at least
MIN_OPS operations each however slow the machine is), while
hydration runs, checked byte for byte against an in-memory model.

Clients own interleaved 24 KiB stripes, so every 64 KiB region is shared
by several clients: region locks, read-modify-write and the hydrator's
copies all contend, while each client can still check its own reads."""
import os
import random
import threading
import time

import nbd

from harness import CloneTest, main, read_all, sha, status, write_random_file

MiB = 1 << 20
STRIPE = 24 * 1024
CLIENTS = 4
SECONDS = float(os.environ.get("ACLONE_STRESS_SECONDS", "8"))
MIN_OPS = 60


class ConcurrencyTest(CloneTest):

    def test_clients_against_model(self):
        size = 48 * MiB
        src_path = os.path.join(self.tmp, "source.img")
        write_random_file(src_path, size, seed=3)
        with open(src_path, "rb") as f:
            model = bytearray(f.read())
        src = self.source_file(src_path, filters=["delay"], extra=["rdelay=2ms"])
        c = self.clone(src, hydrate_rate="2M", hydrate_depth="4")
        stripes = size // STRIPE
        errors = []
        counts = [0] * CLIENTS
        deadline = time.monotonic() + SECONDS

        def client(k):
            rnd = random.Random(100 + k)
            h = c.connect()
            try:
                mine = [s for s in range(stripes) if s % CLIENTS == k]
                while time.monotonic() < deadline or counts[k] < MIN_OPS:
                    s = rnd.choice(mine)
                    base = s * STRIPE
                    off = base + rnd.randrange(STRIPE)
                    n = rnd.randint(1, base + STRIPE - off)
                    op = rnd.random()
                    if op < 0.35:
                        got = h.pread(n, off)
                        if got != bytes(model[off:off + n]):
                            errors.append("client %d read %d+%d differs" % (k, off, n))
                            return
                    elif op < 0.7:
                        data = rnd.randbytes(n)
                        h.pwrite(data, off, nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
                        model[off:off + n] = data
                    elif op < 0.8:
                        h.trim(n, off)
                        model[off:off + n] = bytes(n)
                    elif op < 0.9:
                        h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0)
                        model[off:off + n] = bytes(n)
                    elif op < 0.95:
                        h.flush()
                    else:
                        h.cache(n, off)
                    counts[k] += 1
                h.flush()
                h.shutdown()
            except Exception as e:           # reported below
                errors.append("client %d: %r" % (k, e))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SECONDS + 120)
        self.assertFalse(any(t.is_alive() for t in threads), "client hung")
        self.assertEqual(errors, [])
        print("operations per client:", counts)
        self.assertGreaterEqual(min(counts), MIN_OPS)
        h = c.connect()
        self.assertEqual(read_all(h), bytes(model))
        print("status after the clients:", status(self.meta))
        h.shutdown()
        # Let hydration finish fast, then dest alone must equal the model.
        from harness import cli
        cli("set", self.meta, "rate=0", "depth=32")
        self.wait_complete(120)
        c.stop()
        self.assertEqual(sha(self.dest), sha(bytes(model)))


if __name__ == "__main__":
    main()
