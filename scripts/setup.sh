#!/usr/bin/env bash
# Creates .venv with the CPU torch wheel pinned (never the multi-GB CUDA build) and installs ernielab editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
# The server's browser test drives Debian's Chromium (never a downloaded browser); it skips when none is there.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 ||
    echo "setup: chromium not installed; the browser test will be skipped" >&2
fi
