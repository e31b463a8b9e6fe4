#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (a Python venv for the
# third-party peers the tests talk to), then checks formatting and lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# A venv at $1 with the pinned requirements $2, remade only when they change. Kept under
# ~/.cache so reruns are fast.
venv() {
  if [[ ! -x "$1/bin/python" ]] || ! cmp -s "$2" "$1/.requirements"; then
    echo "==> preparing Python venv at $1"
    python3 -m venv "$1"
    "$1/bin/pip" install --quiet --disable-pip-version-check -r "$2"
    cp "$2" "$1/.requirements"
  fi
}
# Python interpreter with the third-party client libraries the interop tests drive.
VENV="${SLEAP_RTC_VENV:-$HOME/.cache/sleap-rtc/venv}"
venv "$VENV" server/tests/py/requirements.txt
export SLEAP_RTC_TEST_PYTHON="$VENV/bin/python"
# The unmodified upstream SLEAP client (sleap-rtc 0.0.7, what the SLEAP GUI imports), in a venv
# of its own so its dependencies cannot move the pins above (cli/tests/upstream_client.rs).
UPVENV="${SLEAP_RTC_UPSTREAM_VENV:-$HOME/.cache/sleap-rtc/upstream-venv}"
venv "$UPVENV" server/tests/py/upstream-requirements.txt
export SLEAP_RTC_UPSTREAM_PYTHON="$UPVENV/bin/python"

# Debian packages the tests drive: coturn (below), redis-server (server/tests/cluster.rs starts
# its own on 127.0.0.1; the package's system-wide instance is not used) and chromium (the
# dashboard's browser test, cli/tests/dashboard.rs).
PKGS=()
command -v redis-server >/dev/null || PKGS+=(redis-server)
# coturn: the TURN relay the relay tests run (runtime-tokio/tests/turn.rs, cli/tests/relay.rs), as
# its own process on test addresses; the package's system service is not used.
command -v turnserver >/dev/null || PKGS+=(coturn)
# The vendored dimpl's OpenSSL interop tests link the system OpenSSL (vendor/dimpl/SLEAP-RTC-PATCH.md).
command -v pkg-config >/dev/null || PKGS+=(pkg-config)
[[ -f /usr/include/openssl/ssl.h ]] || PKGS+=(libssl-dev)
[[ -x /usr/bin/chromium || -n "${SLEAP_RTC_TEST_CHROMIUM:-}" ]] || PKGS+=(chromium)
# What PyQt6's QtWidgets links (the SLEAP GUI's upload thread is imported by
# cli/tests/upstream_client.rs; no display is needed, only the libraries).
for lib in libGL.so.1:libgl1 libEGL.so.1:libegl1 libxkbcommon.so.0:libxkbcommon0 \
           libfontconfig.so.1:libfontconfig1 libglib-2.0.so.0:libglib2.0-0 libdbus-1.so.3:libdbus-1-3; do
  ldconfig -p | grep -q "${lib%%:*}" || PKGS+=("${lib##*:}")
done
if (( ${#PKGS[@]} )); then
  echo "==> installing ${PKGS[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${PKGS[@]}" >/dev/null
fi
# playwright-core from npm, locked in server/dashboard/test/package-lock.json.
if ! cmp -s server/dashboard/test/package-lock.json server/dashboard/test/node_modules/.installed-lock.json; then
  echo "==> npm ci (playwright-core) in server/dashboard/test"
  (cd server/dashboard/test && npm ci --no-audit --no-fund --loglevel=error && cp package-lock.json node_modules/.installed-lock.json)
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
# Libraries, binaries and test targets: the examples and benches are type-checked by clippy
# above, and linking eight more debug executables that no test runs cost CI minutes it does not
# have (there are no doctests).
cargo test --workspace --locked --lib --bins --tests
# The vendored sctp-proto (see vendor/sctp-proto/SLEAP-RTC-PATCH.md) is outside the workspace: its
# own test suite, with its own lockfile.
echo "==> cargo test (vendor/sctp-proto)"
cargo test --manifest-path vendor/sctp-proto/Cargo.toml --locked
# The vendored dimpl likewise (vendor/dimpl/SLEAP-RTC-PATCH.md).
echo "==> cargo test (vendor/dimpl)"
cargo test --manifest-path vendor/dimpl/Cargo.toml --locked
