#!/usr/bin/env bash
# Local quickstart, for real: builds sleap-rtc, makes sure the real sleap-nn trainer is available
# (if none is found, it is installed into a venv: a LARGE download, torch and CUDA libraries,
# about 7 GB on disk and ~5 minutes), then runs `sleap-rtc quickstart`: an embedded signaling
# server and a worker on this machine, training on a tiny bundled dataset and inference with the
# trained model, all over WebRTC on loopback.
#
# SLEAP_NN=/path/to/sleap-nn skips the search and the install. Extra arguments go to
# `sleap-rtc quickstart` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building sleap-rtc (release; the first build takes a few minutes)"
cargo build --release --locked -p sleap-rtc
if [ -z "${SLEAP_NN:-}" ]; then
  if command -v sleap-nn >/dev/null 2>&1; then
    SLEAP_NN=$(command -v sleap-nn)
  else
    VENV="${SLEAP_NN_VENV:-$HOME/.cache/sleap-rtc/sleap-nn-venv}"
    if [ ! -x "$VENV/bin/sleap-nn" ]; then
      echo "==> sleap-nn not found: installing sleap-nn==0.3.5 into $VENV"
      echo "    this is a large download (torch + CUDA libraries, ~7 GB on disk, ~5 minutes)"
      python3 -m venv "$VENV"
      "$VENV/bin/pip" install --quiet --disable-pip-version-check sleap-nn==0.3.5
    fi
    SLEAP_NN="$VENV/bin/sleap-nn"
  fi
fi
echo "==> using $SLEAP_NN"
exec ./target/release/sleap-rtc quickstart --sleap-nn "$SLEAP_NN" "$@"
