"""Integration: the kernel block path.  This machine's kernel has no NBD
driver, so the clone is exposed as a file by nbdfuse and made a block
device by losetup; ext4 is checked, mounted and written on it while
hydration runs, and again after a server restart.  fstrim on the mounted
clone (guest DISCARD) hydrates the free space without copying it."""
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import time
import unittest

from harness import CloneTest, cli, main, status, wait_for

MiB = 1 << 20


def have_kernel_path():
    if os.geteuid() != 0:
        return "needs root for losetup and mount"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in ("nbdfuse", "losetup", "mkfs.ext4", "e2fsck", "fusermount3"):
        if not shutil.which(tool):
            return "missing " + tool
    return None


def run(*args, timeout=120, check=True, env=None):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else dict(os.environ, **env))
    if check and p.returncode != 0:
        raise AssertionError("%s failed (%d): %s%s" % (" ".join(args), p.returncode,
                                                       p.stdout, p.stderr))
    return p


def tree_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            if rel.startswith("lost+found"):
                continue
            with open(p, "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def fill_nonzero(path, size, seed):
    """Write size bytes of non-zero data (a repeated random MiB): every
    block of the file is allocated, as on a disk that was in use."""
    rnd = random.Random(seed)
    chunk = bytes(b | 1 for b in rnd.randbytes(MiB))
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.write(chunk[:size % MiB])
        f.flush()
        os.fsync(f.fileno())


def ext4_usage(img):
    """Block size, block count, free blocks and the used block ranges
    [start, end) of the ext4 file system in img, from its bitmaps as
    dumpe2fs prints them."""
    out = run("dumpe2fs", img).stdout
    head = {}
    free = []
    for line in out.splitlines():
        if not line.startswith(" ") and ":" in line:
            k, v = line.split(":", 1)
            head.setdefault(k.strip(), v.strip())
        elif line.strip().startswith("Free blocks:"):
            for part in line.split(":", 1)[1].split(","):
                part = part.strip()
                if part:
                    a, _, b = part.partition("-")
                    free.append((int(a), int(b or a) + 1))
    bs = int(head["Block size"])
    count = int(head["Block count"])
    nfree = int(head["Free blocks"])
    free.sort()
    used, pos = [], 0
    for a, b in free:
        if a > pos:
            used.append((pos, a))
        pos = max(pos, b)
    if pos < count:
        used.append((pos, count))
    # The bitmaps and the summary must agree, or the parse is wrong.
    assert sum(b - a for a, b in free) == nfree, (nfree, free[:5])
    return {"block_size": bs, "blocks": count, "free": nfree, "used": used}


def regions_touching(ranges, block_size, region_size):
    """Regions holding at least one block of the [start, end) block ranges."""
    regions = set()
    for a, b in ranges:
        regions.update(range(a * block_size // region_size,
                             (b * block_size - 1) // region_size + 1))
    return regions


def debugfs_cat(img, path):
    p = subprocess.run(["debugfs", "-R", "cat /" + path, img], capture_output=True,
                       timeout=60)
    if p.returncode != 0:
        raise AssertionError("debugfs cat %s failed: %s" % (path, p.stderr.decode()))
    return p.stdout


class KernelPath:
    """nbdfuse + losetup for one NBD URI; mount() on top.  Undone in
    reverse order by close(), whatever state it reached."""

    def __init__(self, tmp, uri, name):
        self.dir = os.path.join(tmp, "fuse-" + name)
        self.mnt = os.path.join(tmp, "mnt-" + name)
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.mnt, exist_ok=True)
        self.loop = None
        self.mounted = False
        self.fuse = subprocess.Popen(["nbdfuse", self.dir, uri],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: os.path.exists(os.path.join(self.dir, "nbd"))
                 or self.fuse.poll() is not None, 20, "nbdfuse")
        if self.fuse.poll() is not None:
            raise AssertionError("nbdfuse failed: " + self.fuse.stderr.read().decode())
        self.loop = run("losetup", "-f", "--show", os.path.join(self.dir, "nbd")).stdout.strip()

    def mount(self):
        run("mount", "-t", "ext4", self.loop, self.mnt)
        self.mounted = True

    def umount(self):
        if self.mounted:
            run("umount", self.mnt)
            self.mounted = False

    def close(self):
        try:
            self.umount()
        finally:
            if self.loop:
                run("losetup", "-d", self.loop, check=False)
                # While something still holds the loop device, losetup -d
                # only sets autoclear: wait until it is really gone, or
                # the FUSE file stays busy.
                sysfs = "/sys/block/%s/loop" % os.path.basename(self.loop)
                end = time.monotonic() + 10
                while os.path.exists(sysfs) and time.monotonic() < end:
                    time.sleep(0.05)
                self.loop = None
            for _ in range(50):
                if run("fusermount3", "-u", self.dir, check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                run("fusermount3", "-uz", self.dir, check=False)
            try:
                self.fuse.wait(10)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait(5)


@unittest.skipIf(have_kernel_path(), have_kernel_path() or "")
class FilesystemTest(CloneTest):

    def make_ext4_source(self):
        files = os.path.join(self.tmp, "files")
        os.makedirs(os.path.join(files, "etc"))
        os.makedirs(os.path.join(files, "var", "lib"))
        rnd = random.Random(5)
        for i in range(40):
            sub = ["", "etc", "var/lib"][i % 3]
            with open(os.path.join(files, sub, "file%02d" % i), "wb") as f:
                f.write(rnd.randbytes(rnd.choice([100, 5000, 70000, 1 * MiB, 3 * MiB])))
        img = os.path.join(self.tmp, "source.img")
        run("mkfs.ext4", "-q", "-F", "-d", files, "-E", "lazy_itable_init=0",
            img, "96M")
        return img, tree_hashes(files)

    def attach(self, server, name):
        kp = KernelPath(self.tmp, server.uri, name)
        self.cleanups.append(kp.close)
        return kp

    def test_ext4_on_the_clone(self):
        img, want = self.make_ext4_source()
        src = self.source_file(img)
        # Phase 1: hydration paused, so that every read and write takes
        # the foreground paths (copy-on-read, read-modify-write).
        c = self.clone(src, hydrate="false")
        kp = self.attach(c, "a")
        run("e2fsck", "-fn", kp.loop)                 # the source's fs, clean
        kp.mount()
        self.assertEqual(tree_hashes(kp.mnt), want)
        # Write files, delete one, sync, unmount, fsck.
        rnd = random.Random(9)
        os.makedirs(os.path.join(kp.mnt, "new"))
        for i in range(20):
            data = rnd.randbytes(rnd.choice([10, 4096, 200000, 2 * MiB]))
            with open(os.path.join(kp.mnt, "new", "n%02d" % i), "wb") as f:
                f.write(data)
            want["new/n%02d" % i] = hashlib.sha256(data).hexdigest()
        os.unlink(os.path.join(kp.mnt, "file00"))
        del want["file00"]
        run("sync")
        self.assertEqual(tree_hashes(kp.mnt), want)
        kp.umount()
        run("e2fsck", "-fn", kp.loop)
        kp.close()
        self.cleanups.remove(kp.close)
        st = self.status_becomes(state="paused")
        self.assertLess(st["hydrated"], st["regions"])

        # Phase 2: restart on the same dest and meta with hydration on;
        # files intact while it runs.
        c.stop()
        c2 = self.clone(src, name="clone2", hydrate_rate="16M")
        kp2 = self.attach(c2, "b")
        run("e2fsck", "-fn", kp2.loop)
        kp2.mount()
        self.assertEqual(tree_hashes(kp2.mnt), want)
        kp2.umount()
        # Let hydration finish: dest alone holds the filesystem.
        self.wait_complete(120)
        kp2.close()
        self.cleanups.remove(kp2.close)
        c2.stop()
        src.stop()
        run("e2fsck", "-fn", self.dest)
        c3 = self.clone(None, name="clone3")          # complete: no source
        kp3 = self.attach(c3, "c")
        kp3.mount()
        self.assertEqual(tree_hashes(kp3.mnt), want)

    def make_trimmable_ext4_source(self, size, big):
        """A fully allocated image (no holes: every byte written, free
        space holding old data) with ext4 on it, some small files, and a
        file of big bytes that was written and then deleted, its blocks
        now free but still holding data.  Returns (image, {file: sha256})."""
        files = os.path.join(self.tmp, "files")
        os.makedirs(os.path.join(files, "etc"))
        rnd = random.Random(21)
        want = {}
        for i, n in enumerate([100, 4096, 70000, 300000, 1 * MiB, 3 * MiB]):
            rel = "%sf%d" % ("etc/" if i % 2 else "", i)
            data = rnd.randbytes(n)
            with open(os.path.join(files, rel), "wb") as f:
                f.write(data)
            want[rel] = hashlib.sha256(data).hexdigest()
        with open(os.path.join(files, "big"), "wb") as f:
            for _ in range(big // MiB):
                f.write(rnd.randbytes(MiB))
        img = os.path.join(self.tmp, "source.img")
        fill_nonzero(img, size, seed=22)
        # No discard and no fallocate-zeroing by mke2fs (either would punch
        # holes into the image); inode tables and journal written out.
        run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E",
            "nodiscard,lazy_itable_init=0,lazy_journal_init=0", "-d", files, img,
            env={"UNIX_IO_NOZEROOUT": "1"})
        os.unlink(os.path.join(files, "big"))
        run("debugfs", "-w", "-R", "rm /big", img)
        run("e2fsck", "-fn", img)
        with open(img, "rb") as f:              # still no hole anywhere
            self.assertEqual(os.lseek(f.fileno(), 0, os.SEEK_HOLE), size)
        return img, want

    def test_fstrim_hydrates_free_space_without_copying(self):
        """Guest DISCARD: fstrim on the mounted clone hydrates the file
        system's free space (here mostly a deleted file's blocks) without
        copying it, so the hydration copies little more than the regions
        holding used blocks, though the source has data everywhere."""
        for tool in ("fstrim", "debugfs", "dumpe2fs", "nbdinfo"):
            if not shutil.which(tool):
                self.skipTest("missing " + tool)
        size, big = 256 * MiB, 160 * MiB
        img, want = self.make_trimmable_ext4_source(size, big)
        usage = ext4_usage(img)
        bs = usage["block_size"]
        used_bytes = (usage["blocks"] - usage["free"]) * bs
        self.assertGreater(usage["free"] * bs, big)     # the deleted file is free
        src = self.source_file(img)
        # The source reports data everywhere: nothing is skipped as zero.
        extents = json.loads(run("nbdinfo", "--map", "--json", src.uri).stdout)
        self.assertEqual(sum(e["length"] for e in extents), size)
        self.assertEqual([e for e in extents if e["type"] != 0], [])

        c = self.clone(src, hydrate="false")
        st0 = self.status_becomes(state="paused")
        self.assertEqual(st0["bytes_skipped"], 0)
        rs = st0["block_size"]
        used_regions = regions_touching(usage["used"], bs, rs)
        used_region_bytes = len(used_regions) * rs
        free_regions = st0["regions"] - len(used_regions)  # holding no used block
        # What a correct clone may copy in all: the regions holding used
        # blocks, plus a margin for what the mount and fstrim read
        # (copy-on-read copies whole regions, readahead reads around the
        # blocks asked for).  A clone that ignored trims would copy the
        # whole image: the bound is far below it.
        read_margin = 16 * MiB
        bound = used_region_bytes + read_margin
        self.assertLess(bound, size // 4)

        kp = self.attach(c, "trim")
        dev = os.path.basename(kp.loop)
        with open("/sys/block/%s/queue/discard_max_bytes" % dev) as f:
            if int(f.read()) == 0:
                self.skipTest("%s (loop over an nbdfuse file) offers no discard "
                              "on this kernel: fstrim cannot reach the clone" % kp.loop)
        kp.mount()
        self.assertNotIn("big", os.listdir(kp.mnt))
        out = run("fstrim", "-v", kp.mnt).stdout
        m = re.search(r"\((\d+) bytes\) trimmed", out)    # "M: 219.3 MiB (N bytes) trimmed"
        self.assertTrue(m, out)
        trimmed = int(m.group(1))
        kp.umount()
        kp.close()
        self.cleanups.remove(kp.close)
        t = time.time()         # the live page is published once a second
        wait_for(lambda: status(self.meta)["updated"] > t, 5, "live page update",
                 interval=0.1)
        st1 = status(self.meta)
        print("\nfs: %d MiB, used %.1f MiB (%d regions of %d KiB = %.1f MiB), "
              "deleted file %d MiB; fstrim: %.1f MiB; after trim: copied %.1f MiB, "
              "skipped %.1f MiB, hydrated %d/%d" %
              (size // MiB, used_bytes / MiB, len(used_regions), rs // 1024,
               used_region_bytes / MiB, big // MiB, trimmed / MiB,
               st1["bytes_copied"] / MiB, st1["bytes_skipped"] / MiB,
               st1["hydrated"], st1["regions"]))
        self.assertEqual(st1["state"], "paused")
        self.assertGreaterEqual(trimmed, big)
        # The trim hydrated without copying at least most of the free
        # regions, and so far more than the deleted file.
        self.assertGreaterEqual(st1["bytes_skipped"], big)
        self.assertGreaterEqual(st1["bytes_skipped"], free_regions * rs * 9 // 10)
        # The mount and fstrim copied only a little (what they read).
        self.assertLessEqual(st1["bytes_copied"], read_margin)
        self.assertEqual(st1["hydrated"] * rs, st1["bytes_copied"] + st1["bytes_skipped"])

        # Let hydration finish: it copies about what the fs uses, far
        # less than the image (a clone ignoring trims copies all of it).
        cli("resume", self.meta)
        self.wait_complete(120)
        st2 = status(self.meta)
        print("complete: copied %.1f MiB, skipped %.1f MiB (image %d MiB, "
              "bound %.1f MiB)" % (st2["bytes_copied"] / MiB, st2["bytes_skipped"] / MiB,
                                   size // MiB, bound / MiB))
        self.assertEqual(st2["errors"], 0)
        self.assertEqual(st2["bytes_copied"] + st2["bytes_skipped"], size)
        self.assertGreaterEqual(st2["bytes_copied"], st1["bytes_copied"])
        self.assertLessEqual(st2["bytes_copied"], bound)
        c.stop()

        # The data: dest alone holds a clean file system with the files,
        # and every region copied and never written matches the source.
        run("e2fsck", "-fn", self.dest)
        for rel, h in want.items():
            self.assertEqual(hashlib.sha256(debugfs_cat(self.dest, rel)).hexdigest(), h, rel)
        self.assertNotIn("big", run("debugfs", "-R", "ls -l /", self.dest).stdout.split())
        v = json.loads(cli("verify", "--json", self.meta, "--source", src.uri,
                           "--dest", self.dest).stdout)
        self.assertEqual(v["mismatched"], 0, v)
        self.assertEqual(v["unhydrated"], 0, v)
        self.assertGreater(v["compared"], 0, v)


if __name__ == "__main__":
    main()
