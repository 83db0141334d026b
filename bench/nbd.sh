#!/usr/bin/env bash
# 4K random read / random write at QD32 with fio's nbd engine: blockd's NBD export vs
# qemu-storage-daemon's NBD export of the same backing, in the same run; prints the ratios.
#
# Backing: a file in /dev/shm (RAM, so the frontends are measured, not a disk). blockd
# serves it with its aio backend when the daemon has bdev_aio_create, else with a malloc bdev
# of the same size (noted in the output). Usage: bench/nbd.sh [SIZE_MIB] [RUNTIME_S]
# Env: BLOCKD (daemon binary; default target/release/blockd, else target/debug/blockd).
set -euo pipefail
SIZE_MIB=${1:-256}
RUNTIME=${2:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BLOCKD=${BLOCKD:-$ROOT/target/release/blockd}
[ -x "$BLOCKD" ] || BLOCKD=$ROOT/target/debug/blockd
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing" >&2; exit 1; }
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio has no nbd engine" >&2; exit 1; }

W=$(mktemp -d /dev/shm/nbdbench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$W"; }
trap cleanup EXIT

IMG=$W/disk.raw
dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MIB" status=none

rpc() { # method json-params
  python3 - "$W/rpc.sock" "$1" "$2" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": sys.argv[2], "params": json.loads(sys.argv[3])}).encode())
buf, dec = b"", json.JSONDecoder()
while True:
    buf += s.recv(65536)
    try:
        r, _ = dec.raw_decode(buf.decode()); break
    except ValueError:
        continue
if "error" in r: sys.exit("%s: %s" % (sys.argv[2], r["error"]))
print(json.dumps(r["result"]))
PY
}

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

"$BLOCKD" -m 0x1 -r "$W/rpc.sock" -S "$W" -L warn & PIDS+=($!)
wait_sock "$W/rpc.sock"
BACKING="aio file $IMG"
if ! rpc bdev_aio_create "{\"filename\":\"$IMG\",\"name\":\"Disk0\",\"block_size\":512}" >/dev/null 2>&1; then
  BACKING="malloc ${SIZE_MIB} MiB (blockd has no aio backend yet)"
  rpc bdev_malloc_create "{\"name\":\"Disk0\",\"num_blocks\":$((SIZE_MIB * 2048)),\"block_size\":512}" >/dev/null
fi
rpc nbd_server_start "{\"unix_path\":\"$W/blockd-nbd.sock\"}" >/dev/null
rpc nbd_export_add '{"bdev_name":"Disk0","name":"disk"}' >/dev/null

qemu-storage-daemon \
  --blockdev "driver=file,node-name=file0,filename=$IMG,cache.direct=off,aio=threads" \
  --blockdev driver=raw,node-name=disk,file=file0 \
  --nbd-server "addr.type=unix,addr.path=$W/qsd-nbd.sock" \
  --export type=nbd,id=exp0,node-name=disk,name=disk,writable=on & PIDS+=($!)
wait_sock "$W/qsd-nbd.sock"

iops() { # socket rw
  fio --name=b --ioengine=nbd --uri="nbd+unix:///disk?socket=$1" --rw="$2" --bs=4k \
      --iodepth=32 --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" \
      --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; d=sys.stdin.read(); j=json.loads(d[d.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}

echo "backing: blockd=$BACKING, qemu-storage-daemon=file $IMG; fio nbd engine, 4k QD32, ${RUNTIME}s"
printf '%-10s %12s %12s %8s\n' workload blockd qsd ratio
for rw in randread randwrite; do
  b=$(iops "$W/blockd-nbd.sock" $rw)
  q=$(iops "$W/qsd-nbd.sock" $rw)
  printf '%-10s %12s %12s %8s\n' $rw "$b" "$q" "$(python3 -c "print('%.2f' % ($b / max($q, 1)))")"
done
