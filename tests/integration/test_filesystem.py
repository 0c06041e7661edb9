"""Integration: the kernel block path.  This machine's kernel has no NBD
driver, so the clone is exposed as a file by nbdfuse and made a block
device by losetup; ext4 is checked, mounted and written on it while
hydration runs, and again after a server restart."""
import hashlib
import os
import random
import shutil
import subprocess
import unittest

from harness import CloneTest, main, wait_for

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


def run(*args, timeout=120, check=True):
    p = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
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
                self.loop = None
            run("fusermount3", "-u", self.dir, check=False)
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


if __name__ == "__main__":
    main()
