"""Integration: the real consumers, in a VM (see vm.py).

One guest boot, three clones of one source, while hydration runs:
  * clone A on 127.0.0.1:PORT, attached by the guest kernel's NBD client
    (nbd-client, /dev/nbd0 and /dev/nbd1);
  * clone B on a Unix socket, given to qemu as its second disk
    (-drive file=nbd+unix://...,if=virtio: qemu's own NBD client), which
    the guest sees as /dev/vda (it has no root disk);
  * clone C, qemu's second disk (/dev/vdb) with reconnect-delay, whose
    server is restarted under the guest's I/O;
  * clone D on 127.0.0.1, served over TLS with a pre-shared key, attached
    by `aclone attach --tls-psk` with 4 connections (relayed for the
    kernel), ext4 on it and a server restart under it.
The guest checks the source's data, makes ext4 on both, writes a file,
and reports checksums; the host then checks each clone holds exactly that,
also after a server restart and once hydration is complete.  Twice the
host restarts clone A's server under an attached kernel client: without
and with nbd-client -persist.

Skips (exit 77) only when qemu or the kernel package cannot be had.
"""
import hashlib
import os
import secrets
import subprocess
import time

from harness import (CLI, PLUGIN, SANITIZER_ENV, CloneTest, PROMPT, free_tcp_port,
                     main, read_all, sha, status, wait_for, write_random_file)
import vm

MiB = 1 << 20
SIZE = 64 * MiB
BOOT_TIMEOUT = 120          # TCG on a busy 2-core machine
RUN_TIMEOUT = 420

GUEST = r"""
say() { echo "@@ $*"; }
sum() { sha256sum | cut -d' ' -f1; }
NBD="10.0.2.2 %(port)d"
# Full paths: busybox applets of the same names would win otherwise.

# 1. The kernel client reads the source's data through the clone.
/usr/sbin/nbd-client $NBD /dev/nbd0 -N vol -b 4096 || say attach-failed nbd0
say nbd0-src16 $(dd if=/dev/nbd0 bs=1M count=16 2>/dev/null | sum)

# 2. Server restart under attached clients in nbd-client's default
# (netlink) mode: nbd0 without -persist, nbd2 with it (nbd-client 3.24
# ignores -persist there: it configures the device and exits).
/usr/sbin/nbd-client -persist $NBD /dev/nbd2 -N vol -b 4096 || say attach-failed nbd2
say restart-me 1
sleep 6
dd if=/dev/nbd0 of=/dev/null bs=4096 count=1 skip=10240 2>/dev/null
r0=$?
dd if=/dev/nbd2 of=/dev/null bs=4096 count=1 skip=10240 2>/dev/null
say netlink-read $r0 $?
/usr/sbin/nbd-client -d /dev/nbd0 >/dev/null 2>&1
/usr/sbin/nbd-client -d /dev/nbd2 >/dev/null 2>&1

# 3. The ioctl mode with -persist, where nbd-client stays as a daemon to
# reconnect.  A flushed write before the restart.
/usr/sbin/nbd-client -nonetlink -persist $NBD /dev/nbd1 -N vol -b 4096 || say attach-failed nbd1
dd if=/dev/urandom of=/tmp/w bs=1M count=1 2>/dev/null
dd if=/tmp/w of=/dev/nbd1 bs=1M seek=48 conv=fsync 2>/dev/null
say persist-wrote $? $(sum < /tmp/w)
say restart-me 2
sleep 6
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nbd1 of=/tmp/r bs=4096 count=1 skip=10240 2>/dev/null
say ioctl-persist-read $? $(stat -c %%s /tmp/r) $(cat /sys/block/nbd1/size)
/usr/sbin/nbd-client -d /dev/nbd1 >/dev/null 2>&1
sleep 1

# What does work: attach again; everything flushed before is there.
/usr/sbin/nbd-client $NBD /dev/nbd1 -N vol -b 4096 || say attach-failed nbd1-again
dd if=/dev/nbd1 of=/tmp/a bs=1M skip=48 count=1 2>/dev/null
r1=$?
dd if=/dev/nbd1 of=/tmp/b bs=1M skip=56 count=1 2>/dev/null
say reattach-read $r1$? $(sum < /tmp/a) $(sum < /tmp/b)
/usr/sbin/nbd-client -d /dev/nbd1 >/dev/null 2>&1

# 4. `aclone attach`: the kernel client through netlink, reconnecting,
# with 4 connections.  A flushed write, a server restart, then reads
# right away: they wait for the new connections instead of failing.
%(cli)s attach --device /dev/nbd5 --connections 4 --timeout 20 --reconnect 60 \
    nbd://10.0.2.2:%(port)d/vol > /tmp/attach.log 2>&1 &
apid=$!
i=0
while ! grep -q "attached to" /tmp/attach.log && [ $i -lt 80 ]; do sleep 0.25; i=$((i+1)); done
dd if=/tmp/w of=/dev/nbd5 bs=1M seek=40 conv=fsync 2>/dev/null
say attach-wrote $?
say restart-me 3
sleep 0.5
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nbd5 of=/tmp/c bs=1M skip=40 count=1 2>/dev/null
r=$?
dd if=/dev/nbd5 of=/tmp/d bs=1M skip=60 count=1 2>/dev/null
say attach-io $r$? $(sum < /tmp/c) $(sum < /tmp/d)

# ext4 on DEV: make, mount, write a file, unmount; report the file's and
# the whole device's checksums as TAG-file and TAG-dev.
ext4_round() {
  /usr/sbin/mke2fs -q -t ext4 -F $1 && mount -t ext4 $1 /mnt || say fs-failed $2
  dd if=/dev/urandom of=/mnt/data.bin bs=1M count=4 2>/dev/null
  sync
  say $2-file $(sum < /mnt/data.bin)
  umount /mnt
  blockdev --flushbufs $1
  say $2-dev $(dd if=$1 bs=1M 2>/dev/null | sum)
}

# 5. ext4 on the kernel client's device (attached by aclone attach);
# then detach it: aclone attach sees that and exits.
ext4_round /dev/nbd5 nbd
/usr/sbin/nbd-client -d /dev/nbd5 >/dev/null 2>&1
sleep 3
kill -0 $apid 2>/dev/null
say attach-exited $?
cat /tmp/attach.log

# 5b. aclone attach with 4 connections, read-only, 512-byte blocks: its
# attributes, a write refused, a server restart under all four
# connections (each one comes back, the data read is the same), then
# aclone attach --detach.
# Established connections to the host's port, from /proc/net/tcp
# (10.0.2.2 is 0202000A there).
conns() { grep -c "0202000A:$(printf %%04X %(port)d) 01 " /proc/net/tcp; }
%(cli)s attach --device /dev/nbd6 --connections 4 --readonly --block-size 512 \
    --timeout 20 --reconnect 60 nbd://10.0.2.2:%(port)d/vol > /tmp/attach6.log 2>&1 &
mpid=$!
# Connected sockets come before NBD_CMD_CONNECT: the device has its
# attributes once aclone attach says so.
i=0
while { [ $(conns) -lt 4 ] || ! grep -q "attached to" /tmp/attach6.log; } &&
      [ $i -lt 80 ]; do sleep 0.25; i=$((i+1)); done
say multi-attached $(cat /sys/block/nbd6/ro) $(cat /sys/block/nbd6/queue/logical_block_size) $(conns)
dd if=/dev/urandom of=/dev/nbd6 bs=4096 count=1 seek=100 oflag=direct 2>/dev/null
say multi-write $?
say multi-before $(dd if=/dev/nbd6 bs=1M skip=12 count=1 iflag=direct 2>/dev/null | sum)
say restart-me 4
# Until the kernel has seen the old server go (or 10 s).
i=0
while [ $(conns) -eq 4 ] && [ $i -lt 40 ]; do sleep 0.25; i=$((i+1)); done
dd if=/dev/nbd6 of=/tmp/e bs=1M skip=12 count=1 iflag=direct 2>/dev/null
r=$?
i=0
while [ $(conns) -lt 4 ] && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done
say multi-read $r $(sum < /tmp/e) $(conns)
%(cli)s attach --detach /dev/nbd6
r=$?
sleep 3
kill -0 $mpid 2>/dev/null
say multi-detached $r $? $(cat /sys/block/nbd6/size)
cat /tmp/attach6.log

# 6. qemu's NBD client: /dev/vda.
say vda-src16 $(dd if=/dev/vda bs=1M count=16 2>/dev/null | sum)
ext4_round /dev/vda vda

# 7. qemu's NBD client with reconnect-delay (/dev/vdb): a server restart
# under it, with reads and a flushed write on either side.
a=$(dd if=/dev/vdb bs=1M skip=4 count=1 2>/dev/null | sum)
say restart-me 5
sleep 6
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vdb of=/tmp/b bs=1M skip=20 count=1 2>/dev/null
r=$?
dd if=/tmp/w of=/dev/vdb bs=1M seek=30 conv=fsync 2>/dev/null
say reconnect-io $r$? $a $(sum < /tmp/b)

# 8. aclone attach over TLS (a pre-shared key; the guest's own copy):
# 4 connections, each relayed for the kernel, which cannot do TLS; ext4
# on it, then a server restart under it and the whole device read; then
# SIGTERM, which detaches it (the relays end with aclone attach).
printf 'alice:%(key)s\n' > /tmp/k.psk
tconns() { grep -c "0202000A:$(printf %%04X %(tport)d) 01 " /proc/net/tcp; }
%(cli)s attach --device /dev/nbd7 --connections 4 --timeout 20 --reconnect 60 \
    --tls-psk /tmp/k.psk nbds://alice@10.0.2.2:%(tport)d/vol > /tmp/attach7.log 2>&1 &
tpid=$!
i=0
while [ $(tconns) -lt 4 ] && [ $i -lt 80 ]; do sleep 0.25; i=$((i+1)); done
sleep 1
say tls-attached $(tconns) $(cat /sys/block/nbd7/size)
ext4_round /dev/nbd7 tls
say restart-me 6
i=0
while [ $(tconns) -eq 4 ] && [ $i -lt 40 ]; do sleep 0.25; i=$((i+1)); done
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/nbd7 of=/tmp/t bs=1M iflag=direct 2>/dev/null
r=$?
i=0
while [ $(tconns) -lt 4 ] && [ $i -lt 60 ]; do sleep 0.5; i=$((i+1)); done
say tls-read $r $(sum < /tmp/t) $(tconns)
# Stopping aclone attach ends the relays: it detaches the device first.
kill $tpid
i=0
while kill -0 $tpid 2>/dev/null && [ $i -lt 40 ]; do sleep 0.25; i=$((i+1)); done
kill -0 $tpid 2>/dev/null
say tls-stopped $? $(cat /sys/block/nbd7/size)
cat /tmp/attach7.log

"""


def h256(b):
    return hashlib.sha256(b).hexdigest()


class VMTest(CloneTest):

    def setUp(self):
        super().setUp()
        try:
            vm.kernel()
        except vm.Unavailable as e:
            self.skipTest(str(e))

    def clone_a(self, src, port, **kw):
        return self.clone(src, name="cloneA", dest=self.dest_a, meta=self.meta_a,
                          tcp_port=port, **kw)

    def test_kernel_client_and_qemu(self):
        self.dest_a = os.path.join(self.tmp, "a.img")
        self.meta_a = os.path.join(self.tmp, "a.meta")
        dest_b = os.path.join(self.tmp, "b.img")
        meta_b = os.path.join(self.tmp, "b.meta")
        src_path = os.path.join(self.tmp, "source.img")
        write_random_file(src_path, SIZE, seed=41)
        with open(src_path, "rb") as f:
            source = f.read()
        src = self.source_file(src_path)
        port = free_tcp_port()
        a = self.clone_a(src, port, hydrate_rate="2M")
        b = self.clone(src, name="cloneB", dest=dest_b, meta=meta_b,
                       hydrate_rate="2M")
        dest_c = os.path.join(self.tmp, "c.img")
        meta_c = os.path.join(self.tmp, "c.meta")
        cc = self.clone(src, name="cloneC", dest=dest_c, meta=meta_c,
                        hydrate_rate="2M")
        self.assertEqual(status(self.meta_a)["state"], "hydrating")
        self.assertEqual(status(meta_b)["state"], "hydrating")
        self.dest_d = os.path.join(self.tmp, "d.img")
        self.meta_d = os.path.join(self.tmp, "d.meta")
        key = secrets.token_hex(32)
        self.psk = os.path.join(self.tmp, "keys.psk")
        with open(os.open(self.psk, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("alice:%s\n" % key)
        self.tport = free_tcp_port()
        d = self.clone_d(src)

        workdir = os.path.join(self.tmp, "vm")
        os.mkdir(workdir)
        try:
            guest = vm.VM(workdir, GUEST % {"port": port, "cli": "/bin/aclone",
                                            "tport": self.tport, "key": key},
                          extra_bins=[CLI],
                          drives=["file=nbd+unix:///?socket=%s,format=raw,"
                                  "if=virtio,cache=none" % b.sock,
                                  "driver=raw,file.driver=nbd,file.server.type=unix,"
                                  "file.server.path=%s,file.reconnect-delay=30,"
                                  "if=virtio,cache=none" % cc.sock])
        except vm.Unavailable as e:
            self.skipTest(str(e))
        self.cleanups.append(guest.kill)
        try:
            booted = guest.wait_for("booted", BOOT_TIMEOUT)
            print("guest at its script %.1f s after qemu started (kernel "
                  "uptime %s s), %s" % (time.monotonic() - guest.started,
                                       booted[0], "KVM" if guest.kvm else "TCG"))
            self.assertEqual(guest.wait_for("nbd0-src16", 120)[0], h256(source[:16 * MiB]))
            # Restart clone A's server while the guest holds the device.
            stops = []
            for n in ("1", "2"):
                self.assertEqual(self.nth(guest, "restart-me", int(n)), n)
                stops.append(a.stop())
                self.servers.remove(a)
                a = self.clone_a(src, port, hydrate_rate="2M")
            for took in stops:
                self.assert_prompt(took, PROMPT, "SIGTERM to exit, guest attached")
            netlink = guest.wait_for("netlink-read", 60)
            wrote = guest.wait_for("persist-wrote", 60)
            self.assertEqual(wrote[0], "0", guest.console())
            ioctl = guest.wait_for("ioctl-persist-read", 120)
            rc, sha48, sha56 = guest.wait_for("reattach-read", 120)
            print("after a server restart, reads: netlink: exit %s; netlink "
                  "-persist: exit %s; -nonetlink -persist: exit %s, %s bytes, "
                  "device size %s" % (netlink[0], netlink[1], *ioctl))
            # What an operator can rely on (README): with nbd-client 3.24
            # and Linux 6.1 a server restart ends the attachment in every
            # mode; reads fail at once rather than hang (netlink: EIO;
            # ioctl -persist: nbd-client takes the clean close as the end
            # and exits, the device has size 0).  Attaching again works,
            # and everything flushed before the restart is there.
            self.assertNotEqual(netlink[0], "0")
            self.assertNotEqual(netlink[1], "0")
            self.assertTrue(ioctl[0] != "0" or ioctl[1] == "0", ioctl)
            self.assertEqual(rc, "00", guest.console())
            self.assertEqual(sha48, wrote[1])
            self.assertEqual(sha56, h256(source[56 * MiB:57 * MiB]))
            # aclone attach: the kernel client rides out a restart too.
            self.assertEqual(guest.wait_for("attach-wrote", 60)[0], "0", guest.console())
            self.assertEqual(self.nth(guest, "restart-me", 3), "3")
            a.stop()
            self.servers.remove(a)
            a = self.clone_a(src, port, hydrate_rate="2M")
            rc, sha40, sha60 = guest.wait_for("attach-io", 120)
            print("aclone attach: I/O after the restart exits %s" % rc)
            self.assertEqual(rc, "00", guest.console())
            self.assertEqual(sha40, wrote[1])
            self.assertEqual(sha60, h256(source[60 * MiB:61 * MiB]))
            nbd_file = guest.wait_for("nbd-file", 180)[0]
            nbd_dev = guest.wait_for("nbd-dev", 180)[0]
            self.assertEqual(guest.wait_for("attach-exited", 30)[0], "1")  # gone
            # Four connections, read-only, 512-byte blocks; a restart.
            ro, lbs, conns = guest.wait_for("multi-attached", 60)
            self.assertEqual((ro, lbs, conns), ("1", "512", "4"), guest.console())
            self.assertNotEqual(guest.wait_for("multi-write", 30)[0], "0")
            before = guest.wait_for("multi-before", 60)[0]
            self.assertEqual(self.nth(guest, "restart-me", 4), "4")
            a.stop()
            self.servers.remove(a)
            a = self.clone_a(src, port, hydrate_rate="2M")
            rc, sha12, conns = guest.wait_for("multi-read", 120)
            print("aclone attach --connections 4: read after the restart exits "
                  "%s, %s connections" % (rc, conns))
            self.assertEqual((rc, conns), ("0", "4"), guest.console())
            self.assertEqual(sha12, before)
            # --detach: the device is gone, and so is its aclone attach.
            self.assertEqual(guest.wait_for("multi-detached", 60),
                             ["0", "1", "0"], guest.console())
            self.assertEqual(guest.wait_for("vda-src16", 120)[0], h256(source[:16 * MiB]))
            vda_file = guest.wait_for("vda-file", 180)[0]
            vda_dev = guest.wait_for("vda-dev", 180)[0]
            # qemu with reconnect-delay rides out a server restart.
            self.assertEqual(self.nth(guest, "restart-me", 5), "5")
            cc.stop()
            self.servers.remove(cc)
            cc = self.clone(src, name="cloneC", dest=dest_c, meta=meta_c,
                            hydrate_rate="2M")
            rc, sha4, sha20 = guest.wait_for("reconnect-io", 120)
            print("qemu reconnect-delay: I/O after the restart exits %s" % rc)
            self.assertEqual(rc, "00", guest.console())
            self.assertEqual(sha4, h256(source[4 * MiB:5 * MiB]))
            self.assertEqual(sha20, h256(source[20 * MiB:21 * MiB]))
            # aclone attach over TLS: relayed, 4 connections, a restart.
            conns, size = guest.wait_for("tls-attached", 120)
            self.assertEqual((conns, size), ("4", str(SIZE // 512)), guest.console())
            tls_file = guest.wait_for("tls-file", 180)[0]
            tls_dev = guest.wait_for("tls-dev", 180)[0]
            self.assertEqual(self.nth(guest, "restart-me", 6), "6")
            d.stop()
            self.servers.remove(d)
            d = self.clone_d(src)
            rc, sha_t, conns = guest.wait_for("tls-read", 180)
            print("aclone attach over TLS: read after the restart exits %s, "
                  "%s connections" % (rc, conns))
            self.assertEqual((rc, sha_t, conns), ("0", tls_dev, "4"), guest.console())
            # SIGTERM: aclone attach detaches the TLS device (size 0) and
            # exits.
            self.assertEqual(guest.wait_for("tls-stopped", 60), ["1", "0"],
                             guest.console())
            guest.wait_for("end", 60)
            guest.wait_exit(30)
            print("\n".join(l for l in guest.lines
                            if any("/dev/nbd%d" % i in l for i in (5, 6, 7))))
            self.assertNotIn(key, d.output())
            for key in ("attach-failed", "fs-failed", "insmod-failed"):
                self.assertIsNone(guest.result(key), guest.console())
        except BaseException:
            print("---- guest console ----\n" + guest.console(200))
            raise

        # The host's view: each clone holds exactly what the guest wrote,
        # after a server restart, and in dest alone once complete.
        for name, meta, dest, dev_sha, file_sha in (
                ("A", self.meta_a, self.dest_a, nbd_dev, nbd_file),
                ("B", meta_b, dest_b, vda_dev, vda_file),
                ("D", self.meta_d, self.dest_d, tls_dev, tls_file)):
            server = {"A": a, "B": b, "D": d}[name]
            server.stop()
            self.servers.remove(server)
            c = self.clone(src, name="clone%s2" % name, dest=dest, meta=meta,
                           hydrate_rate="0")
            h = c.connect()
            data = read_all(h)
            h.shutdown()
            self.assertEqual(h256(data), dev_sha, "clone %s" % name)
            image = os.path.join(self.tmp, "check-%s.img" % name)
            with open(image, "wb") as f:
                f.write(data)
            r = subprocess.run(["e2fsck", "-fn", image], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            r = subprocess.run(["debugfs", "-R", "cat /data.bin", image],
                               capture_output=True)
            self.assertEqual(h256(r.stdout), file_sha, "clone %s" % name)
            wait_for(lambda: status(meta)["state"] == "complete", 120,
                     "clone %s to complete" % name, interval=0.2)
            c.stop()
            self.assertEqual(sha(dest), dev_sha)
        # Clone C: the write made after the restart is there.
        cc.stop()
        with open(dest_c, "rb") as f:
            f.seek(30 * MiB)
            self.assertEqual(h256(f.read(MiB)), wrote[1])

    def clone_d(self, src):
        """Clone D: served over TLS (a pre-shared key) on TCP."""
        return self.server("cloneD", ["--tls=require", "--tls-psk=" + self.psk,
                                      PLUGIN, "source=" + src.uri,
                                      "dest=" + self.dest_d, "meta=" + self.meta_d,
                                      "hydrate-rate=2M"],
                           dict(SANITIZER_ENV), self.tport)

    def nth(self, guest, key, n, timeout=120):
        """The first value of the n-th "@@ key" line."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            vals = [v for k, v in list(guest.results) if k == key]
            if len(vals) >= n:
                return vals[n - 1][0]
            time.sleep(0.1)
        raise AssertionError("guest never reported %s #%d" % (key, n))


if __name__ == "__main__":
    main()
