#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (as `cargo fuzz list` names them: the [[bin]]s of
# fuzz/Cargo.toml) for SECONDS each (default 60), starting from the seed corpus in
# fuzz/corpus/<target>/ (new inputs libFuzzer finds are added there and ignored by git). Installs what it needs: the nightly toolchain and cargo-fuzz, only when
# missing. Fails on the first target that crashes; the input is in fuzz/artifacts/<target>/
# (reproduce: cargo +nightly fuzz run <target> fuzz/artifacts/<target>/crash-...).
#
#   scripts/fuzz.sh [SECONDS]       FUZZ_TARGETS="blk_request rpc_stream" to choose targets
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-60}

rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

cargo +nightly fuzz build
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
for t in $targets; do
  echo "== fuzz $t for ${secs}s"
  mkdir -p "corpus/$t"
  log=$(mktemp)
  if ! cargo +nightly fuzz run "$t" "corpus/$t" -- -max_total_time="$secs" \
    -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    rm -f "$log"
    echo "fuzz target $t failed" >&2
    exit 1
  fi
  grep -E '^#[0-9]+[[:space:]]+DONE' "$log" || tail -n 5 "$log"
  rm -f "$log"
done
