"""A sweep stopped with Ctrl-C leaves no run RUNNING and exits non-zero; two sweeps started together on
one machine (each on its own embedded Ray) both finish, neither disturbing the other."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT

SMALL = ["grid.seed=[0]", "untrained_reference=false", "train.epochs=2", "train.batch_size=64",
         "train.torch_threads=1", "eval.linear_epochs=2", "eval.knn_k=20", "eval.knn_every=0",
         "tune.max_concurrent_trials=1", "tune.system_metrics_s=0", "tune.log_encoder=false"]


def sweep_command(tmp_path, root, *extra: str) -> list[str]:
    args = [sys.executable, str(ROOT / "jobs/sweep.py"), "--config", str(ROOT / "configs/sweeps/demo.yaml")]
    for item in [*SMALL, f"datasets.fashion_mnist.root={root}", f"tune.storage_path={tmp_path / 'ray'}", *extra]:
        args += ["--set", item]
    return args


def statuses(uri: str) -> dict[str, str]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    return {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])} if exp else {}


@pytest.mark.slow
def test_ctrl_c_marks_every_unfinished_run_killed_and_exits_non_zero(tmp_path, small_fashion_mnist):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "sweep.log", "w")
    driver = subprocess.Popen(sweep_command(tmp_path, small_fashion_mnist, "grid.mixture=[none, both]"),
                              cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while "RUNNING" not in statuses(uri).values() or len(statuses(uri)) < 2:  # the sweep run and a trial run
        assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.log").read_text()[-3000:]
        time.sleep(2)
    time.sleep(5)
    driver.send_signal(signal.SIGINT)  # what Ctrl-C sends the sweep's process
    code = driver.wait(timeout=600)
    log.close()
    output = (tmp_path / "sweep.log").read_text()
    assert code == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    final = statuses(uri)
    assert final and set(final.values()) <= {"KILLED", "FINISHED"}, final
    assert [s for n, s in final.items() if n.startswith("demo-")] == ["KILLED"]  # the sweep's own run
    assert "resume it with: python jobs/sweep.py --resume demo-" in output


@pytest.mark.slow
def test_two_sweeps_started_together_on_one_machine_both_finish(tmp_path, small_fashion_mnist):
    procs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
        env.pop("RAY_ADDRESS", None)
        log = open(folder / "sweep.log", "w")
        procs.append((uri, folder, log, subprocess.Popen(
            sweep_command(folder, small_fashion_mnist, "grid.mixture=[none]", f"name=sweep-{name}"),
            cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)))
    for uri, folder, log, proc in procs:
        code = proc.wait(timeout=1200)
        log.close()
        output = (folder / "sweep.log").read_text()
        assert code == 0, output[-3000:]
        assert "Found multiple active Ray instances" not in output
        assert set(statuses(uri).values()) == {"FINISHED"} and len(statuses(uri)) == 2  # the sweep and its trial
