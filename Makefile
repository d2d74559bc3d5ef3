# Everything runs from .venv: `make setup` (scripts/setup.sh --dev) for development and tests, the
# runtime set alone (scripts/setup.sh) for the demo.
PY := .venv/bin/python

.PHONY: setup setup-runtime demo test test-fast lint report lock

setup:
	bash scripts/setup.sh --dev

setup-runtime:
	bash scripts/setup.sh

demo: setup-runtime
	$(PY) jobs/sweep.py --config configs/sweeps/demo.yaml

test: setup
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports

report: setup-runtime
	$(PY) jobs/report.py

lock:
	bash scripts/lock.sh
