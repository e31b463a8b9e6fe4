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

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
