"""A non-finite loss fails the trial fast and names where; an MLflow outage costs no metrics."""

from __future__ import annotations

import logging

import pytest
from mlflow.tracking import MlflowClient

from unmix_ray.compose import load_sweep
from unmix_ray.train.logger import RunLogger

from .conftest import ROOT, free_port
from .services import mlflow_server


@pytest.mark.slow
@pytest.mark.ray
def test_nan_guard_fails_fast_naming_epoch_and_step(ray_local, tmp_path, small_fashion_mnist):
    from unmix_ray.orchestration.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        "grid.mixture=[none]", "grid.seed=[0]", "untrained_reference=false", "train.epochs=3", "train.batch_size=32",
        "train.nan_check_every=4", f"datasets.fashion_mnist.root={small_fashion_mnist}",
        "train.max_failures=0",  # Ray Train retries any worker error; each retry would meet the same step
        "datasets.fashion_mnist.train_subset=512",
        "methods.simclr.optim.name=sgd", "methods.simclr.optim.lr=1.0e+30", "methods.simclr.optim.warmup_epochs=0",
        f"tune.storage_path={tmp_path / 'ray'}",
    ])
    table = run_sweep(sweep, uri)
    assert not table.complete
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    (run,) = client.search_runs([exp.experiment_id], "tags.`unmix.role` = 'trial'")
    assert run.info.status == "FAILED"
    error = run.data.tags["unmix.error"]
    assert error.startswith("non-finite loss at epoch 1, step ") and sweep.trials[0].run_name in error
    step = int(error.split("step ")[1].split()[0])
    assert 1 <= step <= 4  # found within the first check window: fast
    assert "loss" not in run.data.metrics  # no epoch finished, nothing half-logged
    sweep_run = client.search_runs([exp.experiment_id], "tags.`unmix.role` = 'sweep'")[0]
    assert sweep_run.info.status == "FAILED"


@pytest.mark.slow
def test_metrics_logged_during_an_mlflow_outage_land_when_it_returns(tmp_path, caplog):
    port = free_port()
    with mlflow_server(tmp_path, port) as uri:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        logger = RunLogger(uri, run_id)
        assert logger.log({"loss": 3.0}, step=1)
    with caplog.at_level(logging.WARNING, logger="unmix_ray.tracking"):  # server down
        assert not logger.log({"loss": 2.0}, step=2)
        assert not logger.log({"loss": 1.0}, step=3)
    assert len(logger.pending) == 2
    assert "MLflow unreachable" in caplog.text and "training continues" in caplog.text
    with mlflow_server(tmp_path, port) as uri:  # back, same store
        with caplog.at_level(logging.WARNING, logger="unmix_ray.tracking"):
            assert logger.log({"loss": 0.5}, step=4)
        assert "reachable again" in caplog.text
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.0), (4, 0.5)]
        assert logger.pending == []
