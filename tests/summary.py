#!/usr/bin/env python3
"""Summarise make check: one line per stage, every failed and skipped test
with its reason, and a closing line 'N passed, N failed, N skipped'.

    tests/summary.py STAGE=LOG [STAGE=LOG ...]

LOG is a meson test log (one JSON object per line: name, result, stdout,
stderr) or a file of the same shape written by a stage of our own
(tests/package.sh, tests/mutants/run).  A stage whose log is missing or
empty failed before it ran its tests (it did not build, say): it counts as
a failure, never as nothing to report.

Skips are looked for in four places, so that none is silent:
  - a whole test that meson reports SKIP (exit 77);
  - unittest methods that skipped inside a test meson reports OK, which
    harness.main prints as "test skipped: TEST: reason";
  - single checks a test turned off in this configuration, which the
    harness prints as "check skipped: TEST: reason";
  - cmocka's "[  SKIPPED ] name".
"""
import json
import re
import sys

HARNESS_SKIP = re.compile(r"^(test|check) skipped: (.*)$")
CMOCKA_SKIP = re.compile(r"^\[\s*SKIPPED\s*\] (\S+)")


def skips_in(output):
    """(what, reason) for every skip the test's output reports."""
    found = []
    for line in output.splitlines():
        line = line.strip()
        m = HARNESS_SKIP.match(line)
        if m:
            what, _, reason = m.group(2).partition(": ")
            found.append((what + (" (one check)" if m.group(1) == "check" else ""),
                          reason))
            continue
        m = CMOCKA_SKIP.match(line)
        if m:
            found.append((m.group(1), "cmocka skip"))
    return found


def main(args):
    passed = failed = skipped = 0
    failures, skip_lines = [], []
    for arg in args:
        stage, sep, path = arg.partition("=")
        if not sep:
            sys.exit("summary.py: expected STAGE=LOG, got %r" % arg)
        try:
            with open(path) as f:
                records = [json.loads(l) for l in f if l.strip()]
        except (OSError, ValueError) as e:
            records, why = [], str(e)
        else:
            why = "the log is empty"
        if not records:
            failed += 1
            failures.append("%s: no test results (%s): the stage failed "
                            "before running its tests" % (stage, why))
            print("stage %-9s FAILED: no test results in %s" % (stage, path))
            continue
        sp = sf = ss = 0
        seconds = sum(r.get("duration") or 0 for r in records)
        for r in records:
            name, result = r.get("name", "?"), r.get("result")
            out = (r.get("stdout") or "") + "\n" + (r.get("stderr") or "")
            if result in ("OK", "EXPECTEDFAIL"):
                sp += 1
            elif result == "SKIP":
                ss += 1
                reasons = skips_in(out) or [(name, "the whole test skipped "
                                             "(exit 77)")]
                for what, reason in reasons:
                    skip_lines.append("%s: %s: %s" % (stage, what, reason))
                continue
            else:
                sf += 1
                failures.append("%s: %s: %s" % (stage, name, result))
                continue
            for what, reason in skips_in(out):
                skip_lines.append("%s: %s: %s" % (stage, what, reason))
        print("stage %-9s %d passed, %d failed, %d skipped  (%.0f s of tests)"
              % (stage, sp, sf, ss, seconds))
        passed, failed, skipped = passed + sp, failed + sf, skipped + ss
    for line in failures:
        print("FAILED  " + line)
    for line in skip_lines:
        print("SKIPPED " + line)
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
