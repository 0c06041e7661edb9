#!/bin/bash
# Build the Debian packages from a copy of the tracked files, lint them,
# install them on this machine (as root; else into a scratch root with
# dpkg -x), and run the installed plugin and CLI.  Writes a meson-style
# result line to $OUT/testlog.json for tests/summary.py.
#
#   tests/package.sh [OUT]      (default: build-deb)
set -u
OUT=$(realpath -m "${1:-build-deb}")
TOP=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$OUT" && mkdir -p "$OUT/src"
result() {
  printf '{"name": "deb", "result": "%s", "duration": %d}\n' "$1" "$SECONDS" > "$OUT/testlog.json"
  [ "$1" = OK ]
}
fail() { echo "package: $*" >&2; result FAIL; exit 1; }

# 1. A clean source tree: only what git tracks (no build directories).
(cd "$TOP" && git ls-files -z | xargs -0 cp --parents -t "$OUT/src") ||
  fail "cannot copy the source tree"

# 2. Build.  The in-package test run is off (nocheck): make check's other
# stages ran every test on this tree already.  A plain dpkg-buildpackage
# still runs them, as Debian expects (debian/rules).
(cd "$OUT/src" && DEB_BUILD_OPTIONS="nocheck ${DEB_BUILD_OPTIONS:-}" \
   dpkg-buildpackage -us -uc -b) > "$OUT/build.log" 2>&1 ||
  { tail -60 "$OUT/build.log"; fail "dpkg-buildpackage failed (log: $OUT/build.log)"; }
ls "$OUT"/*.deb || fail "no packages"

# 3. lintian: no errors (warnings are shown).
lintian --fail-on error --no-tag-display-limit "$OUT"/*.changes ||
  fail "lintian reports errors"

# 4. Install and run from the installed files.
PLUGIN_DEB=$(ls "$OUT"/nbdkit-plugin-aclone_*.deb)
CLI_DEB=$(ls "$OUT"/aclone_*.deb)
if [ "$(id -u)" = 0 ]; then
  dpkg -i "$PLUGIN_DEB" "$CLI_DEB" || fail "dpkg -i failed"
  trap 'dpkg -r nbdkit-plugin-aclone aclone >/dev/null' EXIT
  nbdkit aclone --dump-plugin | grep -E '^(name|aclone_version)=' ||
    fail "installed plugin: nbdkit aclone --dump-plugin failed"
  aclone --version || fail "installed CLI: aclone --version failed"
  for u in aclone@.socket aclone@.service; do
    [ -f "/lib/systemd/system/$u" ] || fail "unit $u not installed"
  done
  man -w nbdkit-aclone-plugin aclone >/dev/null || fail "man pages not installed"
else
  root="$OUT/root"
  dpkg -x "$PLUGIN_DEB" "$root" && dpkg -x "$CLI_DEB" "$root" || fail "dpkg -x failed"
  nbdkit "$(ls "$root"/usr/lib/*/nbdkit/plugins/nbdkit-aclone-plugin.so)" --dump-plugin |
    grep -E '^(name|aclone_version)=' || fail "extracted plugin failed"
  "$root/usr/bin/aclone" --version || fail "extracted CLI failed"
fi
result OK
