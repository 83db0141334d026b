#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine: installs what the tests need (QEMU,
# fio, libnbd tools, Ceph, SPDK's rpc.py), starts a throw-away single-node Ceph cluster,
# then runs every test (unit, RPC, vhost-user with libblkio, real QEMU guests, Ceph RBD).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bash scripts/install-deps.sh

# A private Ceph cluster for the RBD tests (memstore, 127.0.0.1); stopped on exit.
if [ -x scripts/ceph-cluster.sh ] && command -v ceph-mon >/dev/null; then
  ceph_dir="$root/.cache/ceph-test"
  bash scripts/ceph-cluster.sh stop "$ceph_dir" >/dev/null 2>&1 || true
  bash scripts/ceph-cluster.sh start "$ceph_dir"
  trap 'bash scripts/ceph-cluster.sh stop "$ceph_dir" >/dev/null 2>&1 || true' EXIT
  export CEPH_CONF="$ceph_dir/ceph.conf"
fi

cargo build --all-targets
# Tests boot QEMU guests and run daemons: two at a time is what 2 cores carry.
cargo test --all-targets -- --test-threads=2

# Coverage-guided fuzzing of the guest/peer input parsers, briefly (fuzz/README.md).
bash scripts/fuzz.sh 20
