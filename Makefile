# Everything runs from .venv, created by `make setup` (scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup demo test lint report

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) jobs/sweep.py --config configs/sweeps/demo.yaml

test: setup
	$(PY) -m pytest -q --durations=15

lint: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports

report: setup
	$(PY) jobs/report.py
