"""Each trial's run carries its lineage: the encoder as an MLflow model loadable by its URI, the
dataset as an MLflow dataset input, and MLflow's source and git-commit tags."""

from __future__ import annotations

import mlflow.pytorch
import torch
from mlflow.tracking import MlflowClient

from unmix_ray import checkpoint
from unmix_ray.compose import load_sweep
from unmix_ray.methods import build_method
from unmix_ray.models import build_backbone
from unmix_ray.optim import build_optimizer, build_scheduler
from unmix_ray.orchestration import tracking

from .conftest import ROOT


def test_the_encoder_loads_by_its_model_uri_and_the_run_names_its_data_and_source(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", ["grid.mixture=[both]", "untrained_reference=false"])
    trial = sweep.trials[0]
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, sweep.config.experiment)
    parent = tracking.start_sweep_run(client, exp_id, sweep.name, "demo-1", 1)
    run_id = tracking.start_trial_run(client, exp_id, parent, "demo-1", trial)

    torch.manual_seed(0)
    method = build_method(trial.method, build_backbone(trial.train.backbone, 1))
    optimizer = build_optimizer(method, trial.method.optim, 64)
    folder = checkpoint.write(method, optimizer, build_scheduler(optimizer, trial.method.optim, 10, 4, 64), 4,
                              run_id, trial.to_dict(), tmp_path / "ckpt")
    model_uri = tracking.log_encoder(uri, run_id, str(folder))

    encoder = mlflow.pytorch.load_model(model_uri)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(encoder(x), method.backbone.eval()(x))
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # logging the model leaves the trial's run as it was
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "fashion_mnist"
    assert "/usr/share/datasets/fashion-mnist" in dataset_input.dataset.source
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "jobs/sweep.py" and len(tags["mlflow.source.git.commit"]) == 40
