#!/usr/bin/env bash
# blockd's NBD export of an aio bdev vs qemu-nbd, both on the SAME raw file, measured with
# fio's nbd engine in one run: 4K randread/randwrite at QD32 and 128K sequential read/write
# at QD32. The target (blockd's reactor, or qemu-nbd) is pinned to core 0 and fio to core 1;
# each cell is the median of RUNS runs, alternating targets. Prints a markdown table.
#
# Backing file: in DIR, default /dev/shm (RAM), so the frontends are measured rather than
# this machine's shared virtual disk, which saturates (60-80K 4K IOPS) below what blockd
# serves. Both targets bypass the page cache: blockd's aio bdev opens with O_DIRECT and
# qemu-nbd runs -f raw --cache=none --aio=io_uring; tmpfs accepts O_DIRECT since Linux 6.6
# (on an older kernel, or a filesystem without it, both fall back to the page cache:
# blockd buffered, qemu-nbd --cache=writeback; the header says which). DIR=target/nbdbench
# measures the disk instead.
#
# Usage: bench/nbd.sh [SIZE_MIB] [RUNTIME_S] [RUNS]
# Env: BLOCKD (default target/release/blockd; built if missing), DIR.
set -euo pipefail
SIZE_MIB=${1:-1024}
RUNTIME=${2:-10}
RUNS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BLOCKD=${BLOCKD:-$ROOT/target/release/blockd}
DIR=${DIR:-/dev/shm/blockd-nbdbench}
if [ ! -x "$BLOCKD" ]; then
  (cd "$ROOT" && cargo build --release --bin blockd)
fi
for t in qemu-nbd fio python3 taskset; do
  command -v $t >/dev/null || { echo "$t missing (scripts/install-deps.sh)" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "fio has no nbd engine" >&2; exit 1; }

mkdir -p "$DIR"
W=$(mktemp -d "$DIR/run.XXXXXX")
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$W"
}
trap cleanup EXIT

IMG=$W/disk.raw
# Fully allocated and written (no holes: reads must reach the file system).
dd if=/dev/urandom of="$IMG" bs=1M count="$SIZE_MIB" conv=fsync status=none
FSTYPE=$(stat -f -c %T "$IMG")
if python3 -c "import os,sys; os.close(os.open(sys.argv[1], os.O_RDONLY|os.O_DIRECT))" "$IMG" 2>/dev/null; then
  QCACHE=none
else
  QCACHE=writeback
fi

BLOCKCTL=$(dirname "$BLOCKD")/blockctl
rpc() { # method json-params (blockctl when built next to blockd, else raw JSON-RPC)
  if [ -x "$BLOCKCTL" ]; then
    "$BLOCKCTL" -s "$W/rpc.sock" rpc "$1" "$2" >/dev/null
  else
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
PY
  fi
}
wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

taskset -c 0 "$BLOCKD" -m 0x1 -r "$W/rpc.sock" -S "$W" -L warn & PIDS+=($!)
wait_sock "$W/rpc.sock"
rpc bdev_aio_create "{\"filename\":\"$IMG\",\"name\":\"Disk0\",\"block_size\":512}"
rpc nbd_server_start "{\"unix_path\":\"$W/blockd-nbd.sock\"}"
rpc nbd_export_add '{"bdev_name":"Disk0","name":"disk"}'
ODIRECT=$("$BLOCKCTL" -s "$W/rpc.sock" bdev_get_bdevs -b Disk0 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["driver_specific"]["aio"]["o_direct"])' 2>/dev/null || echo "?")

taskset -c 0 qemu-nbd --persistent --shared=8 -f raw --cache=$QCACHE --aio=io_uring \
  --socket="$W/qnbd.sock" --export-name=disk "$IMG" & PIDS+=($!)
wait_sock "$W/qnbd.sock"

# fio job on core 1; prints "iops bw_MiBps".
run_fio() { # socket rw bs
  taskset -c 1 fio --name=b --ioengine=nbd --uri="nbd+unix:///disk?socket=$1" --rw="$2" \
      --bs="$3" --iodepth=32 --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" \
      --ramp_time=1 --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; d=sys.stdin.read(); j=json.loads(d[d.index("{"):])["jobs"][0]; r,w=j["read"],j["write"]; print(int(r["iops"]+w["iops"]), round((r["bw"]+w["bw"])/1024,1))'
}
median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; m=statistics.median(v); print(int(m) if m>=1000 else m)' "$@"; }

CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
echo "# blockd NBD (aio bdev) vs qemu-nbd, fio nbd engine"
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores ($CPU), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "file: $IMG ($SIZE_MIB MiB, $FSTYPE); blockd: aio bdev (o_direct=$ODIRECT); qemu-nbd: -f raw --cache=$QCACHE --aio=io_uring"
echo "target on core 0, fio on core 1, QD32, ${RUNTIME}s per run, median of $RUNS runs"
echo
echo "| workload | blockd IOPS | qemu-nbd IOPS | ratio | blockd MiB/s | qemu-nbd MiB/s |"
echo "|---|---:|---:|---:|---:|---:|"
for w in "randread 4k" "randwrite 4k" "read 128k" "write 128k"; do
  set -- $w
  bi=(); bb=(); qi=(); qb=()
  for _ in $(seq "$RUNS"); do
    read -r i b < <(run_fio "$W/blockd-nbd.sock" "$1" "$2"); bi+=("$i"); bb+=("$b")
    read -r i b < <(run_fio "$W/qnbd.sock" "$1" "$2"); qi+=("$i"); qb+=("$b")
  done
  B=$(median "${bi[@]}"); Q=$(median "${qi[@]}")
  R=$(python3 -c "print('%.2f' % ($B / max($Q, 1)))")
  echo "| $1 $2 | $B | $Q | ${R}x | $(median "${bb[@]}") | $(median "${qb[@]}") |"
done
echo
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
