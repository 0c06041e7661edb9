"""Integration: a source behind TLS.  nbds:// URIs with a pre-shared key
(source-tls-psk) or certificates (source-tls-certificates,
source-tls-verify), tested against nbdkit --tls=require.  Reconnects use
the same settings, and the key never shows in logs, the metadata file or
the CLI's output.

`aclone attach` over TLS: the kernel cannot speak it, so each connection
goes through a relay thread (src/attach/relay.c).  The kernel's side is
played here by kernel_client.py on the socket the kernel would get
(attach_socket): requests and replies, pipelining, errors, DISC, and a
server that dies with a request in flight (no reply: the kernel must see
a dead connection, not an error).  The kernel itself is test_vm.py's."""
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import unittest

import nbd

from harness import (CloneTest, cli, free_tcp_port, main,
                     read_all, write_random_file)

MiB = 1 << 20


class PskSetup(CloneTest):
    """A key file (alice) and a random source file."""

    def setUp(self):
        super().setUp()
        self.key = secrets.token_hex(32)
        self.psk = os.path.join(self.tmp, "keys.psk")
        with open(os.open(self.psk, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write("alice:%s\n" % self.key)
        self.src_path = os.path.join(self.tmp, "source.img")
        write_random_file(self.src_path, 32 * MiB, seed=21)

    def tls_source(self, name="source"):
        return self.server(name, ["--tls=require", "--tls-psk=" + self.psk,
                                  "file", self.src_path])

    def tls_uri(self, src):
        return "nbds+unix://alice@/?socket=" + src.sock


class PskTest(PskSetup):

    def test_psk_clone_reconnect_no_secrets(self):
        src = self.tls_source()
        c = self.clone(self.tls_uri(src), source_tls_psk=self.psk,
                       hydrate_rate="8M", source_timeout="20")
        h = c.connect()
        with open(self.src_path, "rb") as f:
            want = f.read()
        self.assertEqual(h.pread(MiB, 20 * MiB), want[20 * MiB:21 * MiB])
        self.status_becomes(state="hydrating")
        # The source goes away and comes back: the reconnects use TLS too
        # (a plain connection would be refused by --tls=require).
        src.stop(signal.SIGKILL)
        self.status_becomes(state="waiting", timeout=10)
        src = self.tls_source()
        self.status_becomes(state="hydrating", timeout=15)
        self.finish_and_check(h, c, want, self.src_path)
        texts = {
            "server log": c.output(),
            "status": cli("status", self.meta).stdout,
            "status --json": cli("status", "--json", self.meta).stdout,
            "inspect": cli("inspect", self.meta).stdout,
        }
        # The audit reaches the source with the same settings.
        v = cli("verify", "--json", self.meta, "--source", self.tls_uri(src),
                "--dest", self.dest, "--tls-psk", self.psk)
        self.assertEqual(json.loads(v.stdout)["mismatched"], 0)
        texts["verify"] = v.stdout + v.stderr
        with open(self.meta, "rb") as f:
            texts["metadata file"] = f.read().decode("latin-1")
        for what, text in texts.items():
            self.assertNotIn(self.key, text, what)
            self.assertNotIn(self.key.upper(), text, what)
        self.assertIn("alice", open(self.psk).read())
        self.assertNotIn("alice@", json.loads(texts["status --json"])["source"])

    def test_wrong_key_is_refused(self):
        src = self.tls_source()
        wrong = os.path.join(self.tmp, "wrong.psk")
        with open(wrong, "w") as f:
            f.write("alice:%s\n" % secrets.token_hex(32))
        with self.assertRaises(RuntimeError) as e:
            self.clone(self.tls_uri(src), source_tls_psk=wrong)
        msg = str(e.exception)
        self.assertIn("source nbds+unix://", msg)
        self.assertIn("gnutls", msg)
        self.assertNotIn(self.key, msg)
        self.assertFalse(os.path.exists(self.meta))
        self.assertFalse(os.path.exists(self.dest))

    def test_plain_connection_is_refused(self):
        src = self.tls_source()
        with self.assertRaises(RuntimeError) as e:
            self.clone(src.uri)
        self.assertIn("source nbd+unix://", str(e.exception))
        self.assertFalse(os.path.exists(self.meta))

    def test_tls_settings_need_a_tls_uri(self):
        src = self.tls_source()
        with self.assertRaises(RuntimeError) as e:
            self.clone(src.uri, source_tls_psk=self.psk)
        self.assertIn("not an nbds:// or nbds+unix:// URI", str(e.exception))
        with self.assertRaises(RuntimeError) as e:
            self.clone(self.tls_uri(src), source_tls_psk=self.psk + ".missing")
        self.assertIn("source-tls-psk=", str(e.exception))
        self.assertFalse(os.path.exists(self.meta))


ATTACH_SOCKET = os.environ.get("ACLONE_ATTACH_SOCKET",
                               "build/tests/integration/attach_socket")
KERNEL_CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "kernel_client.py")


class AttachRelayTest(PskSetup):

    def relay(self, uri, script, psk=None):
        """attach_socket running kernel_client.py with script (steps)."""
        path = os.path.join(self.tmp, "script.json")
        with open(path, "w") as f:
            json.dump(script, f)
        return subprocess.Popen(
            [ATTACH_SOCKET, "--tls-psk", psk or self.psk, uri, "--",
             sys.executable, KERNEL_CLIENT, path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def test_relay_serves_the_kernel(self):
        """Every request type the kernel sends, through TLS: the replies
        carry the kernel's cookies, in any order, the data is the model's,
        and it reached the server."""
        src = self.server("source", ["--tls=require", "--tls-psk=" + self.psk,
                                     "memory", "256M"])
        uri = self.tls_uri(src)
        base = 8 * MiB
        data = random.Random(5).randbytes(MiB)
        model = bytearray(data)
        model[128 * 1024:192 * 1024] = bytes(64 * 1024)      # zeroed
        model[256 * 1024:320 * 1024] = bytes(64 * 1024)      # trimmed
        big = 0x0123456789abcdef
        script = [["write", big, base, data.hex(), 1], ["wait", 1],
                  ["flush", 2, 0, 0], ["wait", 1]]
        script += [["read", 100 + i, base + i * 65536, 65536] for i in range(16)]
        script += [["wait", 16],
                   ["zero", 3, base + 128 * 1024, 64 * 1024, 2], ["wait", 1],
                   ["trim", 4, base + 256 * 1024, 64 * 1024], ["wait", 1],
                   ["cache", 5, base, MiB], ["wait", 1],
                   ["read", 6, base, 512 * 1024], ["wait", 1],
                   ["read", 7, 256 * MiB, 4096], ["wait", 1],    # past the end
                   ["read", 8, base + 1000 * 512, 4096], ["wait", 1],
                   # A whole-device discard is one long request; a READ
                   # that long is refused, with an error, not a hang-up.
                   ["write", 12, 150 * MiB, data[:4096].hex()], ["wait", 1],
                   ["trim", 9, 16 * MiB, 200 * MiB], ["wait", 1],
                   ["read", 10, 0, 100 * MiB], ["wait", 1],
                   ["read", 11, 150 * MiB, 4096], ["wait", 1],
                   ["disc"]]
        p = self.relay(uri, script)
        out, err = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 0, err)
        lines = [json.loads(x) for x in out.splitlines()]
        replies = {x["cookie"]: x for x in lines if "cookie" in x}
        self.assertEqual(set(replies), {big, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12} |
                         set(range(100, 116)))
        for k, r in replies.items():
            if k not in (7, 10):
                self.assertEqual(r["error"], 0, "cookie %d" % k)
        self.assertNotEqual(replies[7]["error"], 0, "a read past the end")
        self.assertEqual(replies[10]["error"], 22, "a 100 MiB read: EINVAL")
        self.assertEqual(replies[11]["data"], "00" * 4096)
        for i in range(16):
            self.assertEqual(bytes.fromhex(replies[100 + i]["data"]),
                             data[i * 65536:(i + 1) * 65536], "read %d" % i)
        self.assertEqual(bytes.fromhex(replies[6]["data"]), bytes(model[:512 * 1024]))
        self.assertEqual(bytes.fromhex(replies[8]["data"]),
                         bytes(model[1000 * 512:1000 * 512 + 4096]))
        self.assertEqual(lines[-1], {"eof": True}, "DISC ends the relay")
        # On the server, through a TLS client of its own.
        h = nbd.NBD()
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_psk_file(self.psk)
        h.connect_uri(uri)
        self.assertEqual(h.pread(MiB, base), bytes(model))
        self.assertEqual(h.pread(4096, 150 * MiB), bytes(4096))
        h.shutdown()
        self.assertNotIn(self.key, out + err)

    def test_server_death_is_a_dead_connection(self):
        """The server dies with a read in flight: the relay closes the
        kernel's socket without replying, so that the kernel requeues the
        read rather than failing it."""
        src = self.server("source", ["--tls=require", "--tls-psk=" + self.psk,
                                     "--filter=delay", "memory", "64M",
                                     "rdelay=10"])
        p = self.relay(self.tls_uri(src), [["read", 1, 0, 4096], ["say", "sent"],
                                           ["wait", 1]])
        try:
            self.assertEqual(json.loads(p.stdout.readline()), {"say": "sent"})
            time.sleep(0.5)                 # the read reaches the server
            src.stop(signal.SIGKILL)
            line = p.stdout.readline()      # bounded: the server is gone
            self.assertEqual(json.loads(line), {"eof": True})
            self.assertEqual(p.wait(30), 0)
            self.assertIn("connection lost", p.stderr.read())
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()

    def test_wrong_key_and_plain_uri(self):
        src = self.server("source", ["--tls=require", "--tls-psk=" + self.psk,
                                     "memory", "64M"])
        wrong = os.path.join(self.tmp, "wrong.psk")
        with open(wrong, "w") as f:
            f.write("alice:%s\n" % secrets.token_hex(32))
        p = self.relay(self.tls_uri(src), [["disc"]], psk=wrong)
        out, err = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 1)
        self.assertIn("nbds+unix://", err)
        self.assertNotIn(self.key, out + err)
        # TLS settings for a URI that does not ask for TLS: refused before
        # anything is connected or attached.
        r = cli("attach", "--tls-psk", self.psk, src.uri, check=False)
        self.assertEqual(r.returncode, 1)
        self.assertIn("does not ask for TLS", r.stderr)


def openssl(*args):
    subprocess.run(["openssl"] + list(args), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@unittest.skipUnless(shutil.which("openssl"), "openssl is not installed")
class CertificateTest(CloneTest):
    """X.509: over TCP on 127.0.0.1, since libnbd checks the server's
    name against the URI's host (a Unix socket has none)."""

    def setUp(self):
        super().setUp()
        d = self.tmp
        self.srv = os.path.join(d, "srv")
        self.good = os.path.join(d, "good")
        self.other = os.path.join(d, "other")
        for p in (self.srv, self.good, self.other):
            os.mkdir(p)
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", d + "/ca-key.pem", "-out", d + "/ca-cert.pem",
                "-subj", "/CN=aclone test CA")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                "-keyout", self.srv + "/server-key.pem", "-out", d + "/srv.csr")
        with open(d + "/ext", "w") as f:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                    "extendedKeyUsage=serverAuth\n")
        openssl("x509", "-req", "-in", d + "/srv.csr", "-days", "2",
                "-CA", d + "/ca-cert.pem", "-CAkey", d + "/ca-key.pem",
                "-CAcreateserial", "-extfile", d + "/ext",
                "-out", self.srv + "/server-cert.pem")
        shutil.copy(d + "/ca-cert.pem", self.srv)
        shutil.copy(d + "/ca-cert.pem", self.good)
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", d + "/other-key.pem", "-out", self.other + "/ca-cert.pem",
                "-subj", "/CN=some other CA")
        self.src_path = os.path.join(d, "source.img")
        write_random_file(self.src_path, 8 * MiB, seed=22)
        self.port = free_tcp_port()
        self.server("source", ["--tls=require", "--tls-certificates=" + self.srv,
                               "file", self.src_path], tcp_port=self.port)
        self.uri = "nbds://localhost:%d" % self.port

    def test_verified_certificate(self):
        c = self.clone(self.uri, source_tls_certificates=self.good)
        h = c.connect()
        with open(self.src_path, "rb") as f:
            self.assertEqual(read_all(h), f.read())
        h.shutdown()

    def test_unknown_ca_is_refused(self):
        with self.assertRaises(RuntimeError) as e:
            self.clone(self.uri, source_tls_certificates=self.other)
        self.assertIn("certificate verification", str(e.exception))
        self.assertFalse(os.path.exists(self.meta))

    def test_verify_false_accepts_unknown_ca(self):
        c = self.clone(self.uri, source_tls_certificates=self.other,
                       source_tls_verify="false")
        h = c.connect()
        with open(self.src_path, "rb") as f:
            self.assertEqual(h.pread(MiB, 0), f.read(MiB))
        h.shutdown()


if __name__ == "__main__":
    main()
