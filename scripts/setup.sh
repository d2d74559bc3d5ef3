#!/usr/bin/env bash
# Set up .venv with the project's pinned dependencies, make Fashion-MNIST available, and install
# Debian's chromium for the MLflow UI browser test.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import unmix_ray, ray, mlflow, torch, torchvision, moto, pytest, playwright" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  touch .venv/.installed
fi

bash scripts/get_fashion_mnist.sh
bash scripts/get_chromium.sh || true  # without it only the browser test is skipped
