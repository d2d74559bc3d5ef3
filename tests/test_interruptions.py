"""The sweep's driver interrupted: Ctrl-C leaves no run RUNNING and exits 130; a driver killed outright
resumes by name, every trial exactly once. Two sweeps started together on one machine (each on its own
embedded Ray) both finish, neither disturbing the other."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT
from .mlflow_checks import assert_one_complete_run, epochs_logged, statuses, wait_for

SMALL = ["grid.seed=[0]", "untrained_reference=false", "train.batch_size=64", "train.torch_threads=1",
         "datasets.fashion_mnist.train_subset=512", "datasets.fashion_mnist.test_subset=300",
         "eval.linear_epochs=1", "eval.knn_k=20", "eval.knn_every=0", "tune.max_concurrent_trials=1",
         "tune.system_metrics_s=0", "tune.log_encoder=false"]
FIRST, SECOND = "simclr-fashion_mnist-none-p0.5-s0", "simclr-fashion_mnist-both-p0.5-s0"


def start_sweep(folder, root, *extra: str, new_session: bool = False) -> tuple[str, subprocess.Popen]:
    """`jobs/sweep.py` on the demo config in its own process, its own MLflow database and Ray storage."""
    folder.mkdir(exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    args = [sys.executable, str(ROOT / "jobs/sweep.py"), "--config", str(ROOT / "configs/sweeps/demo.yaml")]
    for item in [*SMALL, f"datasets.fashion_mnist.root={root}", f"tune.storage_path={folder / 'ray'}", *extra]:
        args += ["--set", item]
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with open(folder / "sweep.log", "w") as log:
        return uri, subprocess.Popen(args, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=new_session)


@pytest.mark.slow
@pytest.mark.ray
def test_ctrl_c_marks_every_unfinished_run_killed_and_exits_130(tmp_path, small_fashion_mnist):
    uri, sweep = start_sweep(tmp_path, small_fashion_mnist, "grid.mixture=[none, both]", "train.epochs=4")
    # The sweep's run and a trial's run RUNNING: Ctrl-C lands mid-trial.
    wait_for(lambda: list(statuses(uri).values()).count("RUNNING") >= 2 or sweep.poll() is not None,
             600, "a trial of the sweep to be running", every_s=2)
    assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
    sweep.send_signal(signal.SIGINT)  # what Ctrl-C sends the sweep's process
    code = sweep.wait(timeout=600)
    output = (tmp_path / "sweep.log").read_text()
    assert code == 130, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    final = statuses(uri)
    assert final and set(final.values()) <= {"KILLED", "FINISHED"}, final
    assert [s for n, s in final.items() if n.startswith("demo-")] == ["KILLED"]  # the sweep's own run
    assert "resume it with: python jobs/sweep.py --resume demo-" in output


@pytest.mark.slow
@pytest.mark.ray
def test_two_sweeps_started_together_on_one_machine_both_finish(tmp_path, small_fashion_mnist):
    started = [start_sweep(tmp_path / name, small_fashion_mnist, "grid.mixture=[none]", "train.epochs=1",
                           f"name=sweep-{name}") for name in ("a", "b")]
    for (uri, sweep), name in zip(started, ("a", "b"), strict=True):
        code = sweep.wait(timeout=900)
        output = (tmp_path / name / "sweep.log").read_text()
        assert code == 0, output[-3000:]
        assert "Found multiple active Ray instances" not in output
        assert set(statuses(uri).values()) == {"FINISHED"} and len(statuses(uri)) == 2  # the sweep and its trial


@pytest.mark.slow
@pytest.mark.ray
def test_killed_sweep_driver_resumes_every_trial_exactly_once(tmp_path, small_fashion_mnist):
    epochs = 3
    uri, driver = start_sweep(tmp_path, small_fashion_mnist, "grid.mixture=[none, both]", f"train.epochs={epochs}",
                              "train.checkpoint_every=1", new_session=True)
    try:
        wait_for(lambda: len(epochs_logged(uri, FIRST)) + len(epochs_logged(uri, SECOND)) >= epochs + 2,
                 900, "the first trial finished and the second underway")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started, as when its machine dies
        driver.wait()
    # Resumed by the sweep's name, with no config: the newest instance of "demo", its config from MLflow.
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    resumed = subprocess.run([sys.executable, str(ROOT / "jobs/sweep.py"), "--resume", "demo"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for name in (FIRST, SECOND):
        assert_one_complete_run(uri, name, epochs)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    assert len(client.search_runs([exp.experiment_id], "tags.`unmix.role` = 'sweep'")) == 1
    assert "| fashion_mnist | simclr | resnet_narrow | both@0.5 |" in resumed.stdout
