#!/usr/bin/env bash
# blockd vs qemu-storage-daemon (and fio on the file): one command, see bench/README.md.
#
#   bench/run.sh                 3 runs x 5 s per workload and client mode, idle test; ~20 min
#   bench/run.sh --quick         1 run x 2 s
#   bench/run.sh --runs 5 --runtime 10 --file /mnt/nvme/bench.img
#   bench/run.sh --clients sleep             only the sleeping client (poll: only polling)
#   bench/run.sh --report DIR    only (re)write DIR/table.md and the plots
#
# Builds release binaries, installs fio/qemu-storage-daemon (apt) and matplotlib (pip, into
# .cache/venv) when missing, and writes bench/results/<date>/{run-N.json,idle.json,table.md,
# *.png}. Other options are passed to bench/harness.py (--rows, --workloads, --clients,
# --no-perf, --placement-wait, --poll ...; bench/harness.py --help). perf (for the client's
# syscall counts) is used when it can count syscall tracepoints, else /proc/PID/io.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

runs=3 runtime=5 file="$ROOT/.cache/bench/disk.img" out="" report_only="" extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) runs=1 runtime=2 ;;
    --runs) runs=$2; shift ;;
    --runtime) runtime=$2; shift ;;
    --file) file=$2; shift ;;
    --out) out=$2; shift ;;
    --report) report_only=$2; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) extra+=("$1") ;;
  esac
  shift
done

if [ "$(nproc)" -lt 2 ]; then
  echo "bench/run.sh needs 2 cores (target on core 0, client on core 1)" >&2
  exit 1
fi

# Tools.
if ! command -v fio >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
command -v qemu-storage-daemon >/dev/null || scripts/install-deps.sh demo
VENV=$ROOT/.cache/venv
if ! "$VENV/bin/python3" -c 'import matplotlib' 2>/dev/null; then
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q matplotlib; } ||
    echo "matplotlib unavailable: no plots" >&2
fi
PY=$VENV/bin/python3
[ -x "$PY" ] || PY=python3

if [ -n "$report_only" ]; then
  exec "$PY" bench/report.py "$report_only"
fi

cargo build --release --bin blockd --bin blockctl
out=${out:-$ROOT/bench/results/$(date +%Y-%m-%d-%H%M%S)}
[ "$runs" = 1 ] && [ "$runtime" -le 2 ] && out=${out}-quick
mkdir -p "$out"
"$PY" bench/harness.py --out "$out" --runs "$runs" --runtime "$runtime" \
  --blockd "$ROOT/target/release/blockd" --blockctl "$ROOT/target/release/blockctl" \
  --file "$file" ${extra[@]+"${extra[@]}"}
"$PY" bench/report.py "$out"
echo "results: $out"
