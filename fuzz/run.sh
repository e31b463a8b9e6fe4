#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60) and prints executions, coverage and
# crashes per target. Usage: fuzz/run.sh [SECONDS] [TARGET...]
#
# Stable toolchain: cargo-fuzz needs unstable rustc flags, which RUSTC_BOOTSTRAP=1 unlocks.
# The committed seeds (fuzz/corpus/<target>) are read, never written: what the fuzzer learns goes
# to target/fuzz/corpus/<target>, so reruns continue from it. A crash is saved under
# fuzz/artifacts/<target>/; fix it, then copy the input to fuzz/regressions/<target>/ so that
# `cargo test -p sleap-rtc-fuzz` replays it forever.
# FUZZ_JOBS=N runs N targets at once; FUZZ_SANITIZER=address adds ASan (slower; our code is safe
# Rust, so panics and hangs are what the fuzzers look for).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-60}"
shift || true
JOBS="${FUZZ_JOBS:-1}"
SAN="${FUZZ_SANITIZER:-none}"
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

if [[ $# -gt 0 ]]; then
  TARGETS=("$@")
else
  mapfile -t TARGETS < <(cargo fuzz list --fuzz-dir fuzz)
fi
LOGS="$CARGO_TARGET_DIR/logs"
mkdir -p "$LOGS"

echo "==> building ${#TARGETS[@]} targets (sanitizer: $SAN)"
cargo fuzz build --fuzz-dir fuzz --features libfuzzer -s "$SAN" -O

run_one() {
  local t="$1"
  local work="$CARGO_TARGET_DIR/corpus/$t"
  mkdir -p "$work" "fuzz/artifacts/$t"
  # -timeout: an input that takes longer than 10 s is reported as a hang (a peer could stall us).
  cargo fuzz run --fuzz-dir fuzz --features libfuzzer -s "$SAN" -O "$t" "$work" "fuzz/corpus/$t" -- \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" >"$LOGS/$t.log" 2>&1
}

failed=()
running=0
for t in "${TARGETS[@]}"; do
  echo "==> $t for ${SECS}s (log: $LOGS/$t.log)"
  ( run_one "$t" || echo "$t" >>"$LOGS/failed" ) &
  running=$((running + 1))
  if [[ $running -ge $JOBS ]]; then
    wait -n || true
    running=$((running - 1))
  fi
done
wait || true

printf '\n%-20s %14s %8s %8s %10s  %s\n' target executions exec/s cov features result
for t in "${TARGETS[@]}"; do
  log="$LOGS/$t.log"
  # A log without stats (a build failure, a wrong target name) prints '?' instead of ending the
  # script before its summary.
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" 2>/dev/null | grep -o '[0-9]*$' | tail -1 || true)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" 2>/dev/null | grep -o '[0-9]*$' | tail -1 || true)
  cov=$(grep -o 'cov: [0-9]*' "$log" 2>/dev/null | tail -1 | grep -o '[0-9]*' || true)
  ft=$(grep -o 'ft: [0-9]*' "$log" 2>/dev/null | tail -1 | grep -o '[0-9]*' || true)
  if grep -qx "$t" "$LOGS/failed" 2>/dev/null; then res="CRASH (see $log)"; failed+=("$t"); else res=ok; fi
  printf '%-20s %14s %8s %8s %10s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$res"
done
rm -f "$LOGS/failed"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "crashes in: ${failed[*]}" >&2
  exit 1
fi
