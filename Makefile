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

# Tests spread over up to 4 cores, except those that start Ray (marker `ray`): only one Ray may run on a
# machine at once, so they run one at a time, after the rest.
PARALLEL := -n auto --maxprocesses 4

test: setup
	$(PY) -m pytest -q -m "not ray" $(PARALLEL) --durations=10; rest=$$?; \
	$(PY) -m pytest -q -m ray --durations=15; ray=$$?; \
	if [ $$rest != 0 ]; then exit $$rest; fi; exit $$ray

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PARALLEL)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports

report: setup-runtime
	$(PY) jobs/report.py

lock:
	bash scripts/lock.sh
