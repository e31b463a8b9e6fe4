#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (a Python venv for the
# third-party peers the tests talk to), then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Python interpreter with the third-party client libraries the interop tests drive. Kept under
# ~/.cache so reruns are fast.
VENV="${SLEAP_RTC_VENV:-$HOME/.cache/sleap-rtc/venv}"
REQS=server/tests/py/requirements.txt
if [[ ! -x "$VENV/bin/python" ]] || ! cmp -s "$REQS" "$VENV/.requirements"; then
  echo "==> preparing Python venv at $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS"
  cp "$REQS" "$VENV/.requirements"
fi
export SLEAP_RTC_TEST_PYTHON="$VENV/bin/python"

# redis-server for the multi-instance tests (server/tests/cluster.rs start their own on
# 127.0.0.1); Debian's package.
if ! command -v redis-server >/dev/null; then
  echo "==> installing redis-server"
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null
  fi
  # The package starts a system-wide instance on port 6379; the tests do not use it.
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
