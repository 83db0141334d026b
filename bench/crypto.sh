#!/usr/bin/env bash
# Encrypted disks: the crypto bdev over malloc against `openssl speed -evp aes-256-xts`
# (the AES-XTS-256 limit of one core), and LUKS2 on RBD against the unencrypted image when
# $CEPH_CONF names a cluster (bench/crypto.py; method and figures in bench/README.md,
# "Encryption"). Results: bench/results/<date>-crypto/run-*.json.
#
#   bench/crypto.sh [--rounds 4] [--runtime 5] [--dev-mib 512] [--rbd auto|yes|no]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ "$(nproc)" -lt 2 ]; then
  echo "bench/crypto.sh needs 2 cores (target on core 0, client on core 1)" >&2
  exit 1
fi
command -v openssl >/dev/null || { echo "bench/crypto.sh needs openssl" >&2; exit 1; }
cargo build --release --bin blockd --bin blockctl
exec python3 bench/crypto.py --blockd "$ROOT/target/release/blockd" \
  --blockctl "$ROOT/target/release/blockctl" \
  --out "$ROOT/bench/results/$(date -u +%F)-crypto" "$@"
