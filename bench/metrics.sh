#!/usr/bin/env bash
# The cost of `blockd --metrics`: null QD32 with metrics off vs on, idle CPU with a 15 s
# scrape (bench/metrics.py; figures in bench/README.md).
#
#   bench/metrics.sh [--rounds 3] [--runtime 5] [--idle-seconds 60]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ "$(nproc)" -lt 2 ]; then
  echo "bench/metrics.sh needs 2 cores (target on core 0, client on core 1)" >&2
  exit 1
fi
cargo build --release --bin blockd --bin blockctl
exec python3 bench/metrics.py --blockd "$ROOT/target/release/blockd" \
  --blockctl "$ROOT/target/release/blockctl" "$@"
