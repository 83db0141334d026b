#!/usr/bin/env bash
# blockd demo: serve a sparse local image as vhost-user-blk and boot a real Linux guest
# on it; print the guest's own view of the disk and the exact QEMU command line.
# The image lives in blockd's embedded local pool (no Ceph): `blockctl pool create
# local:demo`, `blockctl image create local:demo/local0`, served by `bdev_local_create`.
#
#   scripts/demo.sh              # blockd --json examples/local.json (default)
#   TARGET=qsd scripts/demo.sh   # same with qemu-storage-daemon, as a reference
#
# The pool root and sockets live in /tmp/blockd-demo (the paths examples/local.json names).
# SPDK names the vhost socket after the controller (vhost.0) in its socket directory;
# blockd's directory is given by BLOCKD_VHOST_DIR here (-S, as in SPDK's vhost app).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=${TARGET:-blockd}
work=/tmp/blockd-demo
pools=$work/pools
image=$pools/demo/local0.img
sock=$work/vhost.0
bash "$repo/scripts/install-deps.sh" demo
mkdir -p "$work"
rm -rf "$sock" "$pools"
(cd "$repo" && cargo build -q --bin blockd --bin blockctl)
blockctl() { "$repo/target/debug/blockctl" "$@" --pool-dir "$pools"; }
blockctl pool create local:demo
blockctl image create local:demo/local0 --size 64

pid=""
cleanup() { [ -z "$pid" ] || { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; }
trap cleanup EXIT

case $target in
  blockd)
    "$repo/target/debug/blockd" --json "$repo/examples/local.json" -S "$work" \
      -r "$work/blockd.sock" >"$work/blockd.log" 2>&1 &
    pid=$!
    ;;
  qsd)
    qemu-storage-daemon \
      --blockdev "driver=file,filename=$image,node-name=local0,cache.direct=on,aio=native" \
      --export "type=vhost-user-blk,id=vhost.0,node-name=local0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
      >"$work/qsd.log" 2>&1 &
    pid=$!
    ;;
  *) echo "TARGET must be blockd or qsd" >&2; exit 2 ;;
esac

# Wait (bounded) for the backend's socket to appear.
for _ in $(seq 100); do
  [ -S "$sock" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "$target exited:" >&2; cat "$work"/*.log >&2; exit 1; }
  sleep 0.1
done
[ -S "$sock" ] || { echo "no socket $sock from $target" >&2; exit 1; }

echo "== $target serves $image ($(du -k "$image" | cut -f1) KiB allocated) on $sock"
rc=0
"$repo/tests/guest/run-guest.sh" -s seed -w "$work" "$sock:1" >"$work/guest.out" || rc=$?
echo "== QEMU command line"
sed -n '2p' "$work/guest.out"
echo "== The guest's own view (from its serial console)"
grep -E '^BLOCKD-' "$work/guest.out" | sed -e 's/^BLOCKD-RESULT /  /' -e 's/^BLOCKD-DONE /  verdict: /'
grep '^# QEMU exit' "$work/guest.out" | sed 's/; console.*//'
echo "== On the host: first bytes of $image"
head -c 64 "$image" | od -An -c | head -2
exit $rc
