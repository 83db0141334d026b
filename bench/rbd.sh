#!/usr/bin/env bash
# RBD data path: blockd's rbd bdev vs fio's rbd engine vs qemu-storage-daemon's rbd driver,
# same cluster, same image, same run. Prints a markdown table with blockd/fio and
# blockd/qsd ratios.
#
#   blockd: `taskset -c 0 blockd -m 0x1`, bdev_rbd_create + vhost_create_blk_controller,
#           driven by `blockctl bench` (libblkio, vhost-user-blk) pinned to core 1.
#   fio:    `--ioengine=rbd` pinned to core 1 (librbd straight, no frontend at all).
#   qsd:    `taskset -c 0 qemu-storage-daemon --blockdev driver=rbd` exporting
#           vhost-user-blk, driven by the same `blockctl bench` on core 1.
# Workloads: 4K randread / randwrite at QD32, 128K sequential read / write at QD32.
#
# Usage: bench/rbd.sh [SIZE_MIB] [RUNTIME_S]. Cluster: $CEPH_CONF, else a private one
# started with scripts/ceph-cluster.sh in target/ceph-bench (stopped again at the end).
# Env: BLOCKD/BLOCKCTL (default target/release/*, else target/debug/*), POOL (testpool).
set -euo pipefail
SIZE_MIB=${1:-256}
RUNTIME=${2:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BLOCKD=${BLOCKD:-$ROOT/target/release/blockd}
BLOCKCTL=${BLOCKCTL:-$ROOT/target/release/blockctl}
[ -x "$BLOCKD" ] || BLOCKD=$ROOT/target/debug/blockd
[ -x "$BLOCKCTL" ] || BLOCKCTL=$ROOT/target/debug/blockctl
POOL=${POOL:-testpool}
command -v qemu-storage-daemon >/dev/null || { echo "qemu-storage-daemon missing" >&2; exit 1; }
fio --enghelp 2>/dev/null | grep -qw rbd || { echo "fio has no rbd engine" >&2; exit 1; }

W=$(mktemp -d /tmp/rbdbench.XXXXXX)
PIDS=()
STARTED_CLUSTER=
IMG=bench-$$
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  [ -n "${CEPH_CONF:-}" ] && timeout 60 rbd rm --no-progress "$POOL/$IMG" >/dev/null 2>&1 || true
  [ -n "$STARTED_CLUSTER" ] && bash "$ROOT/scripts/ceph-cluster.sh" stop "$STARTED_CLUSTER" >/dev/null 2>&1 || true
  rm -rf "$W"
}
trap cleanup EXIT

if [ -z "${CEPH_CONF:-}" ]; then
  STARTED_CLUSTER=$ROOT/target/ceph-bench
  CEPH_MON_PORT_V2=${CEPH_MON_PORT_V2:-23400} CEPH_MON_PORT_V1=${CEPH_MON_PORT_V1:-26800} \
    bash "$ROOT/scripts/ceph-cluster.sh" start "$STARTED_CLUSTER"
  export CEPH_CONF=$STARTED_CLUSTER/ceph.conf
fi

rbd create --size "${SIZE_MIB}M" "$POOL/$IMG"
# Fill it, so reads hit real objects rather than absent ones.
rbd bench --io-type write --io-pattern seq --io-size 4M --io-threads 4 \
  --io-total "${SIZE_MIB}M" "$POOL/$IMG" >/dev/null

rpc() { "$BLOCKCTL" -s "$W/rpc.sock" "$@"; }
wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# A workload: name, blockctl bench pattern, fio rw, block size.
WORKLOADS=("randread 4k:randread:randread:4k" "randwrite 4k:randwrite:randwrite:4k"
           "read 128k:read:read:128k" "write 128k:write:write:128k")

bench_vhost() { # socket pattern bs -> IOPS
  taskset -c 1 "$BLOCKCTL" bench -s "$1" -w "$2" -b "$3" -q 32 -t "$RUNTIME" --no-poll --json |
    python3 -c 'import json,sys; print(int(json.load(sys.stdin)["phases"][0]["iops"]))'
}

bench_fio() { # core rw bs -> IOPS
  local core=$1; shift
  taskset -c "$core" fio --name=b --ioengine=rbd --clientname=admin --pool="$POOL" --rbdname="$IMG" \
      --rw="$1" --bs="$2" --iodepth=32 --time_based --runtime="$RUNTIME" \
      --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; d=sys.stdin.read(); j=json.loads(d[d.index("{"):])["jobs"][0]; print(int(j["read"]["iops"]+j["write"]["iops"]))'
}

declare -A B F F0 Q
# blockd
taskset -c 0 "$BLOCKD" -m 0x1 -r "$W/rpc.sock" -S "$W" -L warn & PIDS+=($!)
wait_sock "$W/rpc.sock"
[ "$(rpc bdev_rbd_create "$POOL" "$IMG" 512)" = Ceph0 ]
rpc vhost_create_blk_controller vhost.0 Ceph0
for w in "${WORKLOADS[@]}"; do IFS=: read -r name pat rw bs <<<"$w"; B[$name]=$(bench_vhost "$W/vhost.0" "$pat" "$bs"); done
rpc vhost_delete_controller vhost.0 2>/dev/null || { sleep 1; rpc vhost_delete_controller vhost.0; }
rpc bdev_rbd_delete Ceph0
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true; PIDS=()

# fio rbd engine: on the client's core (librbd with a core of its own), and on the target's
# core 0 (issue 7's shared-core comparison: the same CPU budget blockd and its librbd have).
for w in "${WORKLOADS[@]}"; do IFS=: read -r name pat rw bs <<<"$w"; F[$name]=$(bench_fio 1 "$rw" "$bs"); done
for w in "${WORKLOADS[@]}"; do IFS=: read -r name pat rw bs <<<"$w"; F0[$name]=$(bench_fio 0 "$rw" "$bs"); done

# qemu-storage-daemon
taskset -c 0 qemu-storage-daemon \
  --blockdev "driver=rbd,node-name=disk,pool=$POOL,image=$IMG,conf=$CEPH_CONF" \
  --export "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path=$W/qsd.sock,writable=on,num-queues=1" \
  & PIDS+=($!)
wait_sock "$W/qsd.sock"
for w in "${WORKLOADS[@]}"; do IFS=: read -r name pat rw bs <<<"$w"; Q[$name]=$(bench_vhost "$W/qsd.sock" "$pat" "$bs"); done

echo
echo "RBD, $(date -u +%F), image ${SIZE_MIB} MiB in $POOL, QD32, ${RUNTIME}s each; blockd=$(basename "$(dirname "$BLOCKD")") build"
echo
echo "blockd and qsd on core 0 (with their librbd threads), client on core 1; fio on core 1, and fio0 on core 0."
echo
echo "| workload | blockd IOPS | fio rbd IOPS | fio0 rbd IOPS | qsd IOPS | blockd/fio | blockd/fio0 | blockd/qsd |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
ratio() { python3 -c "print('%.2f' % ($1 / max($2, 1)))"; }
for w in "${WORKLOADS[@]}"; do
  IFS=: read -r name _ _ _ <<<"$w"
  b=${B[$name]}; f=${F[$name]}; f0=${F0[$name]}; q=${Q[$name]}
  printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$b" "$f" "$f0" "$q" \
    "$(ratio "$b" "$f")" "$(ratio "$b" "$f0")" "$(ratio "$b" "$q")"
done
