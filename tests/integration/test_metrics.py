"""Integration: many clones on one host (issue 13, parts 2 and 3).
`aclone status` and `aclone wait` with several META files, and `aclone
metrics`, the Prometheus text format for node_exporter's textfile
collector: accepted by promtool, every value the one `status --json`
shows, --output replacing its file atomically, label values escaped."""
import json
import os
import re
import shutil
import subprocess
import time

from harness import CloneTest, PROMPT, cli, main, status, wait_for

MiB = 1 << 20
# make check gives the promtool it unpacked from Debian's prometheus
# package (see the Makefile); else one on PATH.
PROMTOOL = os.environ.get("ACLONE_PROMTOOL") or shutil.which("promtool")
STATES = ("stopped", "hydrating", "paused", "waiting", "error", "failed", "complete")
# Fields of status --json that change while a server runs, even idle.
MOVING = ("updated",)

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"(?:,|$)')


def unescape(v):
    """A label value of the text format as it was before escaping."""
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)


def parse_exposition(text):
    """The text format (0.0.4) read strictly: {(name, labels): value},
    labels a sorted tuple of (name, value).  Fails on a sample without
    its family's HELP and TYPE before it, a family's samples not
    together, or a HELP, TYPE or series seen twice."""
    samples, helps, types, done = {}, set(), {}, set()
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            name = line.split()[2]
            seen = helps if line[2] == "H" else types
            assert name not in seen and name not in done, "twice: " + line
            if line[2] == "H":
                helps.add(name)
            else:
                types[name] = line.split()[3]
            continue
        m = SAMPLE.match(line)
        assert m, "not a sample line: %r" % line
        name, labels, value = m.groups()
        if name != current:
            assert name not in done, "samples of %s not together" % name
            if current:
                done.add(current)
            current = name
        assert name in helps and name in types, "no HELP/TYPE before " + name
        pairs, pos = [], 0
        while labels and pos < len(labels):
            lm = LABEL.match(labels, pos)
            assert lm, "bad labels: %r" % labels
            pairs.append((lm.group(1), unescape(lm.group(2))))
            pos = lm.end()
        key = (name, tuple(sorted(pairs)))
        assert key not in samples, "series twice: %r" % (key,)
        samples[key] = float(value)
    return samples, types


def of_volume(samples, volume):
    """The samples of one volume: {(name, other labels): value}."""
    out = {}
    for (name, labels), v in samples.items():
        d = dict(labels)
        if d.pop("volume", None) == volume:
            out[(name, tuple(sorted(d.items())))] = v
    return out


def expected(st):
    """What aclone metrics must show for a clone whose status --json is
    st: {(name, other labels): value}."""
    running = "foreground" in st
    e = {("aclone_metadata_readable", ()): 1,
         ("aclone_info", (("source", st["source"]),)): 1,
         ("aclone_server_running", ()): int(running),
         ("aclone_size_bytes", ()): st["size"],
         ("aclone_region_size_bytes", ()): st["block_size"],
         ("aclone_regions", ()): st["regions"],
         ("aclone_hydrated_regions", ()): st["hydrated"],
         ("aclone_copied_bytes_total", ()): st["bytes_copied"],
         ("aclone_copied_on_read_bytes_total", ()): st["bytes_copied_on_read"],
         ("aclone_skipped_bytes_total", ()): st["bytes_skipped"],
         ("aclone_errors_total", ()): st["errors"],
         ("aclone_in_flight_bytes", ()): st["in_flight"],
         ("aclone_hydration_rate_bytes_per_second", ()): st["rate"],
         ("aclone_last_update_timestamp_seconds", ()): st["updated"]}
    for s in STATES:
        e[("aclone_state", (("state", s),))] = int(st["state"] == s)
    if st["eta_seconds"] >= 0:
        e[("aclone_eta_seconds", ())] = st["eta_seconds"]
    if running:
        f = st["foreground"]
        e[("aclone_hydration_window_bytes", ())] = f["window"]
        e[("aclone_source_latency_seconds", (("kind", "base"),))] = f["base_latency_ms"] / 1e3
        e[("aclone_source_latency_seconds", (("kind", "current"),))] = f["latency_ms"] / 1e3
    return e


def close_enough(key, got, want):
    """JSON gives latencies in ms with 3 decimals, metrics in seconds."""
    if key[0] == "aclone_source_latency_seconds":
        return abs(got - want) <= 0.6e-6
    return got == want


class MetricsTest(CloneTest):

    def setUp(self):
        super().setUp()
        self.src_path, _ = self.random_file(16 * MiB, seed=13)
        self.src = self.source_file(self.src_path)

    def vol(self, name, **params):
        """Start a clone of the source called name: (server, META path)."""
        meta = os.path.join(self.tmp, name + ".meta")
        c = self.clone(self.src, name=name, dest=os.path.join(self.tmp, name + ".img"),
                       meta=meta, **params)
        return c, meta

    def three(self):
        """Three 16 MiB clones: complete (served), paused (served),
        stopped; once their status no longer moves."""
        _, done = self.vol("done")
        _, paused = self.vol("paused", hydrate="false")
        s, stopped = self.vol("stopped", hydrate="false")
        wait_for(lambda: status(paused)["state"] == "paused", 10, "paused")
        wait_for(lambda: status(done)["state"] == "complete", 60, "complete")
        # The rate is recent: it may take a publish to read 0.
        wait_for(lambda: status(done)["rate"] == 0, 10, "rate 0", interval=0.2)
        s.stop()
        self.assertEqual(status(stopped)["state"], "stopped")
        return [done, paused, stopped]

    def promtool(self, text):
        """promtool check metrics accepts text (lint included).  Missing
        promtool fails under make check, which installs it as root."""
        if not PROMTOOL:
            if os.geteuid() == 0:
                self.fail("promtool missing: make check-normal unpacks it from "
                          "the Debian package prometheus")
            self.skipTest("promtool missing (Debian package prometheus)")
        p = subprocess.run([PROMTOOL, "check", "metrics"], input=text,
                           capture_output=True, text=True, timeout=60)
        self.assertEqual((p.returncode, p.stdout + p.stderr), (0, ""), text)

    def test_status_several(self):
        metas = self.three()
        lines = cli("status", *metas).stdout.splitlines()
        self.assertEqual(len(lines), 5, lines)
        self.assertEqual(lines[0].split(), ["NAME", "SIZE", "HYDRATED", "RATE",
                                            "STATE", "ETA"])
        rows = [l.split() for l in lines[1:]]
        self.assertEqual([r[0] for r in rows], ["done", "paused", "stopped", "total"])
        self.assertEqual(rows[0][1:], ["16", "MiB", "100.0%", "0", "B/s", "complete", "0:00"])
        self.assertEqual(rows[1][1:], ["16", "MiB", "0.0%", "0", "B/s", "paused", "?"])
        self.assertEqual(rows[2][1:], ["16", "MiB", "0.0%", "-", "stopped", "?"])
        self.assertEqual(rows[3][1:4], ["48", "MiB", "33.3%"])
        self.assertIn("1 stopped, 1 paused, 1 complete", lines[4])
        # Aligned: every state starts under STATE, every ETA ends under ETA.
        col = lines[0].index("STATE")
        for l, st in zip(lines[1:], ("complete", "paused", "stopped", "1 stopped")):
            self.assertTrue(l[col:].startswith(st), lines)
        self.assertEqual(len(set(map(len, lines))), 1, lines)
        self.assertTrue(all(l == l.rstrip() for l in lines))
        # One META: the one-clone form, no table.
        one = cli("status", metas[0]).stdout
        self.assertNotIn("NAME", one)
        self.assertIn("state:         complete\n", one)

        # --json: an array of exactly the objects status --json prints
        # for each, in the arguments' order.
        arr = json.loads(cli("status", "--json", *metas).stdout)
        self.assertEqual(len(arr), 3)
        for got, meta in zip(arr, metas):
            want = status(meta)
            for k in MOVING:
                got.pop(k)
                want.pop(k)
            self.assertEqual(got, want)

        # A META that cannot be read: reported once, the others shown,
        # exit status 1 (null in its place in the array).
        missing = os.path.join(self.tmp, "missing.meta")
        p = cli("status", metas[0], missing, metas[1], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.count(missing), 1, p.stderr)
        self.assertEqual([l.split()[0] for l in p.stdout.splitlines()],
                         ["NAME", "done", "paused", "total"])
        p = cli("status", "--json", metas[0], missing, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.count(missing), 1, p.stderr)
        arr = json.loads(p.stdout)
        self.assertEqual((arr[0]["state"], arr[1]), ("complete", None))
        self.assertEqual(cli("status", "--json", check=False).returncode, 2)

    def test_wait_several(self):
        metas = self.three()
        done, paused, stopped = metas
        # 16 MiB at 4 MiB/s: about 4 s, several progress lines.
        _, slow = self.vol("slow", hydrate_rate="4M")
        p = cli("wait", "--timeout", "60", done, slow, timeout=90)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(status(slow)["state"], "complete")
        out = p.stdout.splitlines()
        self.assertIn("done: complete", out)
        self.assertEqual(out[-1], "slow: complete")
        self.assertRegex(out[0], r"^\d+\.\d% hydrated, .*/s, eta \S+, "
                                 r"(1 hydrating, 1 complete|2 complete)$")
        self.assertRegex(out[-2], r"^100\.0% hydrated, .*, 2 complete$")

        # One clone paused: the timeout passes, naming it (only it).
        t0 = time.monotonic()
        p = cli("wait", "--timeout", "2", done, paused, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertLess(time.monotonic() - t0, 2 + PROMPT)
        self.assertIn(paused + ": timed out after 2 s at 0.0%, paused", p.stderr)
        self.assertNotIn(done, p.stderr)

        # No server: that clone fails at once, the others are still
        # waited for; exit status 1.
        t0 = time.monotonic()
        p = cli("wait", "--timeout", "30", stopped, done, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertLess(time.monotonic() - t0, PROMPT)
        self.assertEqual(p.stderr.count(stopped), 1)
        self.assertIn("no server", p.stderr)
        self.assertIn("done: complete", p.stdout)
        missing = os.path.join(self.tmp, "missing.meta")
        p = cli("wait", done, missing, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.count(missing), 1, p.stderr)

    def test_metrics_match_status(self):
        metas = self.three()
        names = ["done", "paused", "stopped"]
        before = [status(m) for m in metas]
        text = cli("metrics", *metas).stdout
        after = [status(m) for m in metas]
        samples, types = parse_exposition(text)
        for name, b, a in zip(names, before, after):
            got = of_volume(samples, name)
            wb, wa = expected(b), expected(a)
            self.assertEqual(set(got), set(wb) | set(wa), name)
            for key, v in got.items():
                self.assertTrue(any(key in w and close_enough(key, v, w[key])
                                    for w in (wb, wa)),
                                "%s %s = %s; status says %s or %s" %
                                (name, key, v, wb.get(key), wa.get(key)))
        self.assertEqual(of_volume(samples, "done")[("aclone_eta_seconds", ())], 0)
        self.assertNotIn(("aclone_eta_seconds", ()), of_volume(samples, "paused"))
        self.assertNotIn(("aclone_hydration_window_bytes", ()),
                         of_volume(samples, "stopped"))
        for name, kind in types.items():
            self.assertEqual(kind, "counter" if name.endswith("_total") else "gauge")
        # Without a META: nothing, which is a valid exposition.
        self.assertEqual(cli("metrics").stdout, "")

    def test_metrics_output_atomic(self):
        metas = self.three()
        textdir = os.path.join(self.tmp, "textfile")
        os.mkdir(textdir)
        out = os.path.join(textdir, "aclone.prom")
        with open(out, "w") as f:
            f.write("# old\n")
        old = open(out)
        ino = os.stat(out).st_ino
        p = cli("metrics", "--output", out, *metas)
        self.assertEqual(p.stdout, "")
        # Replaced by a rename: a reader of the old file keeps it whole,
        # the name is a new file, and no temporary file is left.
        self.assertEqual(old.read(), "# old\n")
        old.close()
        self.assertNotEqual(os.stat(out).st_ino, ino)
        self.assertEqual(os.listdir(textdir), ["aclone.prom"])
        with open(out) as f:
            samples, _ = parse_exposition(f.read())
        self.assertEqual(samples[("aclone_state", (("state", "paused"),
                                                   ("volume", "paused")))], 1)
        self.assertEqual(os.stat(out).st_mode & 0o777, 0o644 & ~self.umask())
        # The temporary file is PATH.tmp-PID beside it, fsync'd before
        # the rename (seen with strace when there is one).
        if shutil.which("strace"):
            p = subprocess.run(["strace", "-f", "-e", "trace=openat,fsync,rename",
                                cli_path(), "metrics", "--output", out] + metas,
                               capture_output=True, text=True, timeout=60)
            calls = [l for l in p.stderr.splitlines() if "aclone.prom" in l or "fsync" in l]
            self.assertRegex("\n".join(calls), r'openat\(.*"%s\.tmp-\d+".*\n'
                             r'fsync\(\d+\).*\nrename\("%s\.tmp-\d+", "%s"\)'
                             % ((re.escape(out),) * 3))
        # A META that cannot be read: the others are written, it shows
        # as unreadable; exit status 1.
        missing = os.path.join(self.tmp, "missing.meta")
        p = cli("metrics", "--output", out, missing, metas[0], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertEqual(p.stderr.count(missing), 1, p.stderr)
        with open(out) as f:
            samples, _ = parse_exposition(f.read())
        self.assertEqual(of_volume(samples, "missing"),
                         {("aclone_metadata_readable", ()): 0})
        self.assertEqual(of_volume(samples, "done")[("aclone_metadata_readable", ())], 1)
        # An output that cannot be written: reported, nothing left behind.
        bad = os.path.join(self.tmp, "nodir", "aclone.prom")
        p = cli("metrics", "--output", bad, metas[0], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn(bad, p.stderr)
        self.assertFalse(os.path.exists(os.path.dirname(bad)))
        self.assertEqual(os.listdir(textdir), ["aclone.prom"])

    def umask(self):
        u = os.umask(0)
        os.umask(u)
        return u

    def test_metrics_label_escaping_and_names(self):
        metas = self.three()
        # A stopped clone's META copied under names that need escaping.
        weird = 'we"ird\\vol\nx'
        wmeta = os.path.join(self.tmp, weird + ".meta")
        shutil.copyfile(metas[2], wmeta)
        text = cli("metrics", wmeta, metas[0]).stdout
        self.assertIn('aclone_size_bytes{volume="we\\"ird\\\\vol\\nx"} 16777216\n', text)
        samples, _ = parse_exposition(text)
        self.assertEqual(of_volume(samples, weird)[("aclone_state", (("state", "stopped"),))], 1)
        # Two META files with one name: the second is left out (two
        # series alike would make the collector drop the whole file).
        os.mkdir(os.path.join(self.tmp, "other"))
        twin = os.path.join(self.tmp, "other", "done.meta")
        shutil.copyfile(metas[2], twin)
        p = cli("metrics", metas[0], twin, check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn(twin, p.stderr)
        samples, _ = parse_exposition(p.stdout)
        self.assertEqual(of_volume(samples, "done")[("aclone_state", (("state", "complete"),))], 1)
        # The status table shows the name too, made printable.
        lines = cli("status", wmeta, metas[0]).stdout.splitlines()
        self.assertEqual(lines[1].split()[0], 'we"ird\\vol?x')

    def test_promtool_accepts_metrics(self):
        metas = self.three()
        self.promtool(cli("metrics", *metas).stdout)
        # Escaped labels, an unreadable META, a clone hydrating.
        wmeta = os.path.join(self.tmp, 'q"uo\\te\nd.meta')
        shutil.copyfile(metas[2], wmeta)
        _, slow = self.vol("slow", hydrate_rate="2M")
        wait_for(lambda: status(slow)["eta_seconds"] > 0, 10, "an ETA", interval=0.1)
        p = cli("metrics", wmeta, os.path.join(self.tmp, "missing.meta"), slow,
                *metas, check=False)
        self.assertEqual(p.returncode, 1)
        self.promtool(p.stdout)
        self.assertRegex(p.stdout, r'aclone_eta_seconds\{volume="slow"\} \d+\n')


def cli_path():
    from harness import CLI
    return CLI


if __name__ == "__main__":
    main()
