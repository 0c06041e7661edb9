"""A small Linux VM for testing the real consumers of an NBD export: the
kernel's NBD client (nbd-client, /dev/nbdX) and qemu's own NBD client
(a -drive given as an nbd+unix:// URI).

* Kernel: Debian's linux-image-amd64, downloaded with apt-get and
  unpacked with dpkg-deb (not installed), cached in ACLONE_VM_CACHE.
  ACLONE_VM_OFFLINE=1 (set in package builds, which must not use the
  network) uses only a cached one.
* initramfs: busybox-static, nbd-client and mke2fs from the host with the
  libraries ldd names, the few kernel modules needed, loaded in the order
  their depends= fields give, and an /init that runs a test's script.
* qemu-system-x86_64 with KVM when it works, else TCG.  A /dev/kvm that
  opens is not enough: in some sandboxes a KVM guest hangs before its
  first console line.  So KVM is tried once with a trivial guest that
  must print within KVM_PROBE_S, and the verdict is kept in the cache.
  ACLONE_VM_ACCEL=kvm or tcg overrides.
* user-mode networking, so that the guest reaches the host's loopback at
  10.0.2.2 and nothing leaves the machine.

Debian's busybox-static runs its own applets before anything on PATH
(nbd-client and mke2fs are applets too), so scripts call the host's tools
by full path: /usr/sbin/nbd-client, /usr/sbin/mke2fs.

The guest reports on its serial console; lines starting with "@@ " are
results ("@@ key value...").  Every wait is bounded and the VM is always
killed.
"""
import glob
import gzip
import os
import re
import shutil
import subprocess
import threading
import time

CACHE = os.environ.get("ACLONE_VM_CACHE", "/var/tmp/aclone-vm-cache")
# The modules the tests need; their dependencies are added.  crc32c_generic
# is asked for by ext4 at mount time through the crypto API (no modprobe in
# the initramfs, so it is loaded up front).
MODULES = ["virtio_pci", "virtio_net", "virtio_blk", "nbd", "crc32c_generic",
           "ext4"]
GUEST_IP = "10.0.2.15"
HOST_IP = "10.0.2.2"
KVM_PROBE_S = 20


class Unavailable(Exception):
    """qemu or the kernel package cannot be had: the test skips."""


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def kernel():
    """(vmlinuz, modules dir) of Debian's current kernel, unpacked in CACHE."""
    os.makedirs(CACHE, exist_ok=True)
    try:
        deps = run(["apt-cache", "depends", "linux-image-amd64"], timeout=60).stdout
        pkg = re.search(r"Depends: (linux-image-\S+)", deps).group(1)
    except (subprocess.SubprocessError, AttributeError, OSError):
        pkg = None
    debs = sorted(glob.glob(os.path.join(CACHE, (pkg or "linux-image-*") + "_*.deb")))
    if not debs and pkg and os.environ.get("ACLONE_VM_OFFLINE") != "1":
        try:
            run(["apt-get", "download", pkg], cwd=CACHE, timeout=600)
        except (subprocess.SubprocessError, OSError) as e:
            raise Unavailable("cannot download %s: %s" % (pkg, getattr(e, "stderr", e)))
        debs = sorted(glob.glob(os.path.join(CACHE, pkg + "_*.deb")))
    if not debs:
        raise Unavailable("no Debian kernel package (apt-get download linux-image-amd64)")
    deb = debs[-1]
    root = deb[:-4] + ".root"
    if not os.path.isdir(root):
        tmp = root + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        run(["dpkg-deb", "-x", deb, tmp], timeout=300)
        os.rename(tmp, root)
    vmlinuz = glob.glob(os.path.join(root, "boot", "vmlinuz-*"))
    mods = glob.glob(os.path.join(root, "lib", "modules", "*"))
    if not vmlinuz or not mods:
        raise Unavailable("%s holds no kernel" % deb)
    return vmlinuz[0], mods[0]


def module_order(moddir, wanted):
    """Module files for wanted and their dependencies, dependencies first
    (each module's modinfo depends= field)."""
    index = {}
    for dirpath, _, files in os.walk(os.path.join(moddir, "kernel")):
        for f in files:
            if f.endswith(".ko"):
                index[f[:-3].replace("-", "_")] = os.path.join(dirpath, f)
    order, seen = [], set()

    def visit(name):
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in index:
            raise Unavailable("kernel module %s not in %s" % (name, moddir))
        deps = run(["modinfo", "-F", "depends", index[name]]).stdout.strip()
        for d in filter(None, deps.split(",")):
            visit(d)
        order.append(index[name])
    for w in wanted:
        visit(w)
    return order


def copy_with_libs(binary, root):
    """Copy a host binary and the shared libraries ldd lists into root."""
    def put(path):
        dest = os.path.join(root, path.lstrip("/"))
        if not os.path.exists(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(os.path.realpath(path), dest)
    put(binary)
    out = subprocess.run(["ldd", binary], capture_output=True, text=True).stdout
    for m in re.finditer(r"(/\S+) \(0x", out):
        put(m.group(1))


def build_initramfs(workdir, moddir, script, extra_bins=()):
    """An initramfs whose /init loads the modules, brings up the network
    and runs script (busybox sh), then powers off.  Returns its path."""
    root = os.path.join(workdir, "initramfs")
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "sbin", "proc", "sys", "dev", "mnt", "tmp", "modules", "etc"):
        os.makedirs(os.path.join(root, d))
    busybox = shutil.which("busybox")
    if not busybox or "=>" in subprocess.run(["ldd", busybox], capture_output=True,
                                             text=True).stdout:
        raise Unavailable("a static busybox (busybox-static) is not installed")
    shutil.copy2(busybox, os.path.join(root, "bin", "busybox"))
    for path in extra_bins:                      # e.g. the aclone CLI
        copy_with_libs(os.path.abspath(path), root)
        os.symlink(os.path.abspath(path), os.path.join(root, "bin", os.path.basename(path)))
    for tool in ("nbd-client", "mke2fs"):
        path = shutil.which(tool) or os.path.join("/usr/sbin", tool)
        if not os.path.exists(path):
            raise Unavailable("%s is not installed" % tool)
        copy_with_libs(path, root)
        if not os.path.exists(os.path.join(root, "sbin", tool)):
            os.symlink(path, os.path.join(root, "sbin", tool))
    loads = []
    for i, ko in enumerate(module_order(moddir, MODULES)):
        name = "%02d-%s" % (i, os.path.basename(ko))
        shutil.copy2(ko, os.path.join(root, "modules", name))
        loads.append("insmod /modules/%s || echo '@@ insmod-failed %s'" % (name, name))
    init = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
%s
ifconfig lo 127.0.0.1 up
ifconfig eth0 %s netmask 255.255.255.0 up
route add default gw %s
echo "@@ booted $(cut -d' ' -f1 /proc/uptime)"
(
%s
) 2>&1
echo "@@ end"
sync
poweroff -f
""" % ("\n".join(loads), GUEST_IP, HOST_IP, script)
    with open(os.path.join(root, "init"), "w") as f:
        f.write(init)
    os.chmod(os.path.join(root, "init"), 0o755)
    out = os.path.join(workdir, "initramfs.gz")
    files = subprocess.run(["find", "."], cwd=root, capture_output=True,
                           check=True).stdout
    cpio = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc"], cwd=root,
                          input=files, capture_output=True, check=True).stdout
    with gzip.open(out, "wb", compresslevel=1) as f:
        f.write(cpio)
    return out


def accel(workdir):
    """"kvm" or "tcg" (see the top of the file)."""
    forced = os.environ.get("ACLONE_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
    except OSError:
        return "tcg"
    verdict = os.path.join(CACHE, "kvm-verdict")
    try:
        with open(verdict) as f:
            return f.read().strip()
    except OSError:
        pass
    probe = os.path.join(workdir, "kvm-probe")
    os.makedirs(probe, exist_ok=True)
    v = VM(probe, "true", accel_name="kvm")
    try:
        v.wait_for("booted", KVM_PROBE_S)
        result = "kvm"
    except AssertionError:
        result = "tcg"
    finally:
        v.kill()
    with open(verdict, "w") as f:
        f.write(result + "\n")
    return result


class VM:
    """A running guest.  lines: its console so far; results: the "@@"
    lines as (key, [values]) in order."""

    def __init__(self, workdir, script, drives=(), memory=512, accel_name=None,
                 extra_bins=()):
        qemu = shutil.which("qemu-system-x86_64")
        if not qemu:
            raise Unavailable("qemu-system-x86_64 (qemu-system-x86) is not installed")
        vmlinuz, moddir = kernel()
        self.kvm = (accel_name or accel(workdir)) == "kvm"
        initrd = build_initramfs(workdir, moddir, script, extra_bins)
        cmd = [qemu, "-nodefaults", "-no-user-config", "-display", "none",
               "-m", str(memory), "-smp", "2" if self.kvm else "1",
               "-accel", "kvm" if self.kvm else "tcg",
               "-cpu", "host" if self.kvm else "max",
               "-kernel", vmlinuz, "-initrd", initrd,
               "-append", "console=ttyS0 panic=-1 quiet loglevel=4",
               "-no-reboot", "-serial", "stdio",
               "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]
        for d in drives:
            cmd += ["-drive", d]
        self.lines = []
        self.results = []
        self.cond = threading.Condition()
        self.log = open(os.path.join(workdir, "console.log"), "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.log.write(line + "\n")
            self.log.flush()
            with self.cond:
                self.lines.append(line)
                if line.startswith("@@ "):
                    parts = line[3:].split()
                    if parts:
                        self.results.append((parts[0], parts[1:]))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_for(self, key, timeout):
        """Values of the first "@@ key" line; AssertionError after timeout
        or if the guest stops first."""
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for k, v in self.results:
                    if k == key:
                        return v
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError("guest never reported %s (%.0f s)" % (key, timeout))
                self.cond.wait(min(left, 0.5))

    def result(self, key):
        for k, v in self.results:
            if k == key:
                return v
        return None

    def console(self, tail=120):
        with self.cond:
            return "\n".join(self.lines[-tail:])

    def wait_exit(self, timeout):
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.reader.join(5)
        self.log.close()
