"""Integration: a source behind TLS.  nbds:// URIs with a pre-shared key
(source-tls-psk) or certificates (source-tls-certificates,
source-tls-verify), tested against nbdkit --tls=require.  Reconnects use
the same settings, and the key never shows in logs, the metadata file or
the CLI's output."""
import json
import os
import secrets
import shutil
import signal
import subprocess
import unittest

from harness import (CloneTest, cli, free_tcp_port, main,
                     read_all, write_random_file)

MiB = 1 << 20


class PskTest(CloneTest):

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
