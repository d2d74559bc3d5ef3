#!/usr/bin/env bash
# Set up .venv from the lock files and make Fashion-MNIST available. Idempotent: a second run only checks.
#   scripts/setup.sh           what the demo needs: requirements.lock (runtime pins) and the project
#   scripts/setup.sh --dev     also the dev tools (requirements-dev.lock) and Debian's chromium for the
#                              MLflow UI browser test (installed only as root; never with sudo)
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=requirements.lock
MARK=.venv/.installed-runtime
if [ "${1:-}" = "--dev" ]; then
  LOCK=requirements-dev.lock
  MARK=.venv/.installed-dev
fi
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$MARK" ] || [ "$LOCK" -nt "$MARK" ] || [ pyproject.toml -nt "$MARK" ]; then
  # Exactly the locked versions, with no resolution, as the cluster image installs them.
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -r "$LOCK"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  touch "$MARK"
fi

bash scripts/get_fashion_mnist.sh
if [ "${1:-}" = "--dev" ]; then
  # Without it only the browser test cannot run; CI (UNMIX_REQUIRE_SERVICES=1) needs it.
  bash scripts/get_chromium.sh || [ "${UNMIX_REQUIRE_SERVICES:-0}" != 1 ]
fi
