#!/usr/bin/env bash
# aclone demo: clone a disk holding an ext4 filesystem and read a file out
# of the clone at once, while the copy runs in the background.
#
#   tests/demo.sh            run, print, stop everything
#   KEEP=1 tests/demo.sh     keep serving the clone until Ctrl-C
#
# Uses ACLONE_PLUGIN / ACLONE_CLI (default: the build tree).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
plugin=${ACLONE_PLUGIN:-$top/build/plugin/aclone.so}
cli=${ACLONE_CLI:-$top/build/src/aclone}
work=$(mktemp -d /tmp/aclone-demo-XXXXXX)
pids=()
loop=
fuse=

cleanup () {
  set +e
  mountpoint -q "$work/mnt" 2>/dev/null && umount "$work/mnt"
  [ -n "$loop" ] && losetup -d "$loop"
  [ -n "$fuse" ] && fusermount3 -u "$work/fuse" 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_file () {   # wait_file PATH SECONDS
  for _ in $(seq $(( $2 * 10 ))); do [ -e "$1" ] && return 0; sleep 0.1; done
  echo "demo: timed out waiting for $1" >&2
  return 1
}

echo "== 1. A source disk: 256 MiB, ext4, a few files"
mkdir -p "$work/files/etc" "$work/fuse" "$work/mnt"
echo "Hello from the source volume, cloned by aclone." > "$work/files/hello.txt"
head -c 20M /dev/urandom > "$work/files/etc/blob.bin"
mkfs.ext4 -q -F -d "$work/files" "$work/source.img" 256M
nbdkit -f -U "$work/source.sock" -P "$work/source.pid" file "$work/source.img" &
pids+=($!)
wait_file "$work/source.pid" 10

echo "== 2. Start the clone (usable at once; hydration in the background)"
# (A sanitizer build's plugin needs its runtime preloaded into nbdkit.)
env ${ACLONE_TEST_PRELOAD:+LD_PRELOAD="$ACLONE_TEST_PRELOAD"} \
nbdkit -f -U "$work/clone.sock" -P "$work/clone.pid" "$plugin" \
  source="nbd+unix:///?socket=$work/source.sock" \
  dest="$work/clone.img" meta="$work/clone.meta" hydrate-rate=16M &
pids+=($!)
wait_file "$work/clone.pid" 20
uri="nbd+unix:///?socket=$work/clone.sock"
echo "clone URI: $uri"

echo "== 3. Read a file out of the clone (nbdfuse + loop + mount)"
nbdfuse "$work/fuse" "$uri" &
fuse=$!
pids+=($fuse)
wait_file "$work/fuse/nbd" 20
if [ "$(id -u)" = 0 ]; then
  loop=$(losetup -f --show "$work/fuse/nbd")
  mount -o ro "$loop" "$work/mnt"
  got=$(cat "$work/mnt/hello.txt")
  cmp "$work/files/etc/blob.bin" "$work/mnt/etc/blob.bin"
  umount "$work/mnt"
else
  # Without root: read the file system image through the FUSE file.
  got=$(debugfs -R "cat /hello.txt" "$work/fuse/nbd" 2>/dev/null)
fi
echo "hello.txt in the clone: $got"
[ "$got" = "$(cat "$work/files/hello.txt")" ]

echo "== 4. aclone status"
"$cli" status "$work/clone.meta"

if [ "${KEEP:-0}" = 1 ]; then
  echo
  echo "Serving $uri until Ctrl-C.  Try:"
  echo "  $cli wait $work/clone.meta"
  echo "  qemu-img info '$uri'"
  wait "${pids[1]}"
else
  "$cli" wait --timeout 60 "$work/clone.meta" > /dev/null
  echo "== 5. Hydration complete: the clone no longer needs its source"
  "$cli" status "$work/clone.meta" | grep -E 'state|bytes'
  echo "demo: OK"
fi
