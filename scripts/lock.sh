#!/usr/bin/env bash
# Regenerate requirements.lock (runtime) and requirements-dev.lock (runtime + the dev extra) from
# pyproject.toml: pip resolves each set once, from the package index in use, and every package it would
# install is pinned exactly. Commit both files with the pyproject.toml change that needed them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --report "$tmp/runtime.json" .
"$PY" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --report "$tmp/dev.json" ".[dev]"
"$PY" - "$tmp" <<'PYTHON'
import json
import sys

tmp = sys.argv[1]
for report, out, what in (("runtime.json", "requirements.lock", "runtime: the project's dependencies"),
                          ("dev.json", "requirements-dev.lock",
                           "development: the runtime pins plus the dev extra (tests, lint)")):
    installs = json.load(open(f"{tmp}/{report}"))["install"]
    pins = sorted({(i["metadata"]["name"].lower(), i["metadata"]["version"]) for i in installs
                   if i["metadata"]["name"].lower().replace("_", "-") != "unmix-ray"})
    header = [f"# Exact pins of every package, {what}, resolved together from pyproject.toml",
              "# for Python 3.11 on Linux x86-64. One lock, installed the same way everywhere:",
              "#   pip install --no-deps -r requirements.lock && pip install --no-deps .",
              "# Regenerate after changing pyproject.toml: scripts/lock.sh"]
    open(out, "w").write("\n".join(header + [f"{n}=={v}" for n, v in pins]) + "\n")
    print(f"{out}: {len(pins)} packages")
PYTHON
