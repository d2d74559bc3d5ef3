"""Every command docs/cluster.md marks as runnable here (```sh local, ```sh local-error) runs as
written, from the repository root, with the project's environment first on PATH: the plans and
validators succeed, the refused commands exit 2 without writing anything, and the stand-in's
commands start a cluster, run a job on it that MLflow records, and stop it again."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .cluster_files import DOCS, local_blocks
from .conftest import ROOT

pytestmark = pytest.mark.slow

BLOCKS = local_blocks(DOCS.read_text())
STANDIN = next(cs for _, cs in BLOCKS if any("local_standin.py up" in c for c in cs))
SUITE = [c for _, cs in BLOCKS for c in cs if c.startswith("python -m pytest")]
SINGLE = [c for marker, cs in BLOCKS if cs is not STANDIN for c in cs
          if marker == "local" and not c.startswith("python -m pytest")]
REFUSED = [c for marker, cs in BLOCKS if marker == "local-error" for c in cs]


def shell(script: str, tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """``script`` in bash from the repository root, as a user with the project's venv active would
    run it; temp files (and the stand-in's default folder) under ``tmp_path``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", "TMPDIR": str(tmp_path),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'untouched.db'}"}
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_docs_mark_commands_of_every_kind():
    assert SINGLE and REFUSED and SUITE and len(STANDIN) == 3


@pytest.mark.parametrize("command", SINGLE)
def test_a_documented_command_runs(command, tmp_path):
    done = shell(command, tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("command", REFUSED)
def test_a_documented_refusal_exits_2_and_writes_nothing(command, tmp_path):
    done = shell(command, tmp_path, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr.strip()
    assert not (tmp_path / "untouched.db").exists()


def test_the_documented_test_commands_are_part_of_the_suite():
    """The suite runs them: each names test files that exist and are collected by default."""
    for command in SUITE:
        files = [w for w in shlex.split(command) if w.endswith(".py")]
        assert files, command
        for f in files:
            assert (ROOT / f).is_file() and re.fullmatch(r"tests/test_\w+\.py", f), f


@pytest.mark.ray
def test_the_standin_commands_run_a_job_that_mlflow_records(tmp_path):
    """The stand-in block as written, with a look at MLflow before the last command stops it."""
    *start_and_submit, down = STANDIN
    check = ("python -c " + shlex.quote(
        "import json, os; from mlflow.tracking import MlflowClient; c = MlflowClient(); "
        "e = c.get_experiment_by_name('unmix-ray'); "
        "print('RUNS=' + json.dumps([(r.info.run_name, r.info.status, r.data.metrics.get('knn_top1'), "
        "os.environ['MLFLOW_TRACKING_URI']) for r in c.search_runs([e.experiment_id])]))"))
    done = shell("\n".join([*start_and_submit, check, down]), tmp_path, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    runs = json.loads(next(line[5:] for line in done.stdout.splitlines() if line.startswith("RUNS=")))
    trials = [r for r in runs if r[0] == "simclr-fashion_mnist-none-p0.5-s0"]
    assert len(runs) == 2 and len(trials) == 1, runs  # the sweep's run and its one trial
    name, status, knn, uri = trials[0]
    assert status == "FINISHED" and knn > 10 and uri.startswith("http://127.0.0.1:"), trials
    assert "stopped the stand-in" in done.stdout
    assert not (tmp_path / "untouched.db").exists()
