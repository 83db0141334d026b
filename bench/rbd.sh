#!/usr/bin/env bash
# RBD data path: blockd's rbd bdev vs fio's rbd engine vs qemu-storage-daemon's rbd driver,
# same cluster, same image, same run. Prints a markdown table of medians with blockd/fio,
# blockd/fio0 and blockd/qsd ratios.
#
#   blockd: `taskset -c 0 blockd -m 0x1` (its librbd threads inherit core 0),
#           bdev_rbd_create + vhost_create_blk_controller, driven by `blockctl bench`
#           (libblkio, vhost-user-blk, sleeping on the completion eventfd) pinned to core 1.
#   fio:    `--ioengine=rbd` pinned to core 1 (librbd straight, no frontend at all), and
#   fio0:   the same pinned to core 0: the CPU budget blockd and its librbd have (issue 7's
#           shared-core comparison).
#   qsd:    `taskset -c 0 qemu-storage-daemon --blockdev driver=rbd` exporting
#           vhost-user-blk, driven by the same `blockctl bench` on core 1.
# Workloads: 4K randread / randwrite and 128K sequential read / write, all at QD32.
#
# The single-node cluster drifts and the host is noisy, so the targets take turns: every
# round runs every workload on every target, and the table shows the median of the rounds.
# The cluster drifts within a round too (4K writes on a fresh cluster fall from ~20k to
# ~5k IOPS in round 2 and climb back over the rounds after), and a target's turn depends
# on the turn before it (128K writes on one cluster: with the order blockd fio fio0 qsd
# rotated, blockd made 0.86x QSD; with blockd fio qsd fio0 rotated, 1.23x). So the order of each round
# is a row of a balanced Latin square (Williams): over 4 rounds every target takes every
# place once and follows every other target once. Use a multiple of 4 rounds. blockd and
# qsd stay up (idle) between turns.
#
# Usage: bench/rbd.sh [SIZE_MIB] [RUNTIME_S] [ROUNDS]. Cluster: $CEPH_CONF, else a private
# one started with scripts/ceph-cluster.sh in target/ceph-bench (stopped again at the end).
# Env: BLOCKD/BLOCKCTL (default target/release/*, else target/debug/*), POOL (testpool),
# BLOCKD_ARGS (extra blockd options, e.g. "--poll never").
set -euo pipefail
SIZE_MIB=${1:-256}
RUNTIME=${2:-5}
ROUNDS=${3:-4}
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

wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# A workload: name, blockctl bench pattern, fio rw, block size.
WORKLOADS=("randread 4k:randread:randread:4k" "randwrite 4k:randwrite:randwrite:4k"
           "read 128k:read:read:128k" "write 128k:write:write:128k")
TARGETS=(blockd fio fio0 qsd)
ORDERS=("0 1 3 2" "1 2 0 3" "2 3 1 0" "3 0 2 1") # Williams square over TARGETS

CPU_PER_IO=$ROOT/bench/cpu_per_io.py
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime + stime of a whole process

bench_vhost() { # socket pattern bs target-pid -> "IOPS target-µs/IO client-µs/IO"
  local t0 out
  t0=$(ticks "$4")
  out=$(python3 "$CPU_PER_IO" --json -- taskset -c 1 "$BLOCKCTL" bench -s "$1" -w "$2" -b "$3" \
          -q 32 -t "$RUNTIME" --no-poll --json)
  python3 -c 'import json,os,sys; j=json.loads(sys.argv[1]); hz=os.sysconf("SC_CLK_TCK")
print(int(j["iops"]), round((int(sys.argv[3]) - int(sys.argv[2])) / hz * 1e6 / j["ios"], 1), round(j["client_us"], 1))' \
    "$out" "$t0" "$(ticks "$4")"
}

bench_fio() { # core rw bs -> "IOPS fio-µs/IO 0" (fio's CPU, its librbd included)
  local core=$1; shift
  python3 "$CPU_PER_IO" --json -- taskset -c "$core" fio --name=b --ioengine=rbd --clientname=admin \
      --pool="$POOL" --rbdname="$IMG" --rw="$1" --bs="$2" --iodepth=32 --time_based \
      --runtime="$RUNTIME" --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; j=json.load(sys.stdin); print(int(j["iops"]), round(j["client_us"], 1), 0)'
}

# blockd
# shellcheck disable=SC2086
taskset -c 0 "$BLOCKD" -m 0x1 -r "$W/rpc.sock" -S "$W" -L warn ${BLOCKD_ARGS:-} & PIDS+=($!)
BLOCKD_PID=$!
wait_sock "$W/rpc.sock"
[ "$("$BLOCKCTL" -s "$W/rpc.sock" bdev_rbd_create "$POOL" "$IMG" 512)" = Ceph0 ]
"$BLOCKCTL" -s "$W/rpc.sock" vhost_create_blk_controller vhost.0 Ceph0 >/dev/null
# qemu-storage-daemon
taskset -c 0 qemu-storage-daemon \
  --blockdev "driver=rbd,node-name=disk,pool=$POOL,image=$IMG,conf=$CEPH_CONF" \
  --export "type=vhost-user-blk,id=e0,node-name=disk,addr.type=unix,addr.path=$W/qsd.sock,writable=on,num-queues=1" \
  >"$W/qsd.log" 2>&1 & PIDS+=($!)
QSD_PID=$!
wait_sock "$W/qsd.sock"

# Results: one line per measurement, "workload|target|iops|target µs/IO|client µs/IO".
RES=$W/results
: >"$RES"
for round in $(seq "$ROUNDS"); do
  for w in "${WORKLOADS[@]}"; do
    IFS=: read -r name pat rw bs <<<"$w"
    for i in ${ORDERS[$(( (round - 1) % ${#ORDERS[@]} ))]}; do
      t=${TARGETS[$i]}
      case $t in
        blockd) m=$(bench_vhost "$W/vhost.0" "$pat" "$bs" "$BLOCKD_PID") ;;
        qsd) m=$(bench_vhost "$W/qsd.sock" "$pat" "$bs" "$QSD_PID") ;;
        fio) m=$(bench_fio 1 "$rw" "$bs") ;;
        fio0) m=$(bench_fio 0 "$rw" "$bs") ;;
      esac
      read -r iops tcpu ccpu <<<"$m"
      echo "$name|$t|$iops|$tcpu|$ccpu" >>"$RES"
      echo "round $round/$ROUNDS $name $t: $iops IOPS, CPU µs/IO target $tcpu client $ccpu" >&2
    done
  done
done

echo
echo "RBD, $(date -u +%F), image ${SIZE_MIB} MiB in $POOL, QD32, medians of $ROUNDS interleaved rounds × ${RUNTIME}s; blockd=$(basename "$(dirname "$BLOCKD")") build ${BLOCKD_ARGS:-}"
echo
echo "blockd and qsd on core 0 (with their librbd threads), client on core 1; fio on core 1, and fio0 on core 0."
echo
python3 - "$RES" "${WORKLOADS[@]}" <<'EOF'
import statistics, sys
# (workload, target) -> one (IOPS, target µs/IO, client µs/IO) per round, in round order.
runs = {}
for line in open(sys.argv[1]):
    if line.strip():
        name, t, iops, tcpu, ccpu = line.strip().split("|")
        runs.setdefault((name, t), []).append((int(iops), float(tcpu), float(ccpu)))
med = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
names = [w.split(":")[0] for w in sys.argv[2:]]
print("| workload | blockd IOPS | fio rbd IOPS | fio0 rbd IOPS | qsd IOPS | blockd/fio | blockd/fio0 | blockd/qsd |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for name in names:
    b, f, f0, q = (med.get((name, t), 0) for t in ("blockd", "fio", "fio0", "qsd"))
    r = lambda a, c: f"{a / c:.2f}" if c else "-"
    print(f"| {name} | {b:.0f} | {f:.0f} | {f0:.0f} | {q:.0f} | {r(b, f)} | {r(b, f0)} | {r(b, q)} |")

# The cluster drifts between rounds, so the ratio within each round is the steadier figure.
print()
print("Ratio of blockd to each peer in the same round, and the median of those ratios:")
print()
print("| workload | blockd/fio0 per round | median | blockd/fio per round | median | blockd/qsd per round | median |")
print("|---|---|--:|---|--:|---|--:|")
for name in names:
    cells = []
    for peer in ("fio0", "fio", "qsd"):
        pairs = zip(runs.get((name, "blockd"), []), runs.get((name, peer), []))
        ratios = [b[0] / p[0] for b, p in pairs if p[0]]
        cells.append(", ".join(f"{x:.2f}" for x in ratios) or "-")
        cells.append(f"{statistics.median(ratios):.2f}" if ratios else "-")
    print(f"| {name} | " + " | ".join(cells) + " |")

# CPU per I/O: the target process (blockd, qsd: with their librbd threads; fio: all of it),
# and the vhost-user client on core 1. IOPS per core = 1e6 / (µs per I/O).
print()
print("CPU µs per I/O, medians: target process (+ vhost-user client), and IOPS per busy core of the target:")
print()
print("| workload | blockd | qsd | fio | fio0 | blockd IOPS/core | qsd IOPS/core | fio0 IOPS/core |")
print("|---|--:|--:|--:|--:|--:|--:|--:|")
for name in names:
    m = {t: (statistics.median(r[1] for r in v), statistics.median(r[2] for r in v))
         for (n, t), v in runs.items() if n == name}
    cell = lambda t: (f"{m[t][0]:.1f}" + (f" (+{m[t][1]:.1f})" if m[t][1] else "")) if t in m else "-"
    per_core = lambda t: f"{1e6 / m[t][0] / 1000:.1f}k" if t in m and m[t][0] else "-"
    print(f"| {name} | {cell('blockd')} | {cell('qsd')} | {cell('fio')} | {cell('fio0')} | "
          f"{per_core('blockd')} | {per_core('qsd')} | {per_core('fio0')} |")
EOF
