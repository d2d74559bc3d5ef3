"""jobs/linear_eval.py: a finished run evaluated again from its checkpoint, results logged on the run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from unmix_ray.compose import load_sweep
from unmix_ray.data import fashion_mnist
from unmix_ray.methods import build_method
from unmix_ray.models import build_backbone
from unmix_ray.orchestration import tracking

from .conftest import ROOT
from .test_report import load_job


@pytest.fixture
def finished_run(tmp_path, small_fashion_mnist):
    """A trial run as the sweep leaves it: FINISHED, tagged with its checkpoint (a state.pt folder)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        f"datasets.fashion_mnist.root={small_fashion_mnist}", "grid.mixture=[cutmix]", "train.epochs=2",
        "eval.knn_k=10",
        "eval.linear_epochs=3", "eval.paper_epochs=2", "eval.feature_batch_size=128"])
    trial = next(t for t in sweep.trials if t.variant == "cutmix")
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, sweep.config.experiment)
    parent = tracking.start_sweep_run(client, exp_id, sweep.name, "s-1", 1)
    run_id = tracking.start_trial_run(client, exp_id, parent, "s-1", trial)
    torch.manual_seed(0)
    method = build_method(trial.method, build_backbone(trial.train.backbone, 1))
    ckpt = tmp_path / "epoch=0002"
    ckpt.mkdir()
    torch.save({"model": method.state_dict(), "epoch": 2, "run_id": run_id, "trial": trial.to_dict()},
               ckpt / "state.pt")
    client.set_tag(run_id, tracking.TAG_CHECKPOINT, str(ckpt))
    client.set_terminated(run_id, "FINISHED")
    return uri, run_id, ckpt


def knn_top1_by_hand(ckpt, root, k: int = 10, t: float = 0.1) -> float:
    state = torch.load(ckpt / "state.pt", weights_only=True)
    method = build_method(load_sweep(ROOT / "configs/sweeps/demo.yaml").trials[0].method,
                          build_backbone("resnet_narrow", 1))
    method.load_state_dict(state["model"])
    method.eval()

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = fashion_mnist.load(root, split)
        with torch.no_grad():
            f = method.features((data.images.float() / 255 - 0.2860) / 0.3530)
        return F.normalize(f, dim=1), data.labels

    bank, bank_labels = features("train")
    queries, labels = features("test")
    sim, idx = (queries @ bank.T).topk(k, dim=1)
    votes = torch.zeros(len(labels), 10).scatter_add_(1, bank_labels[idx], (sim / t).exp())
    return 100.0 * (votes.argmax(1) == labels).double().mean().item()


def test_paper_protocol_and_knn_logged_on_the_run(finished_run, small_fashion_mnist, monkeypatch, capsys):
    uri, run_id, ckpt = finished_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = load_job("linear_eval")
    assert job.main(["--run-id", run_id, "--protocol", "paper", "--knn", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    printed = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    run = MlflowClient(uri).get_run(run_id)
    for name in ("knn_top1", "knn_top5", "linear_paper_top1_last", "linear_paper_top1_best",
                 "linear_paper_top5_last", "linear_paper_top5_best"):
        assert 0 <= run.data.metrics[name] <= 100 and run.data.metrics[name] == pytest.approx(printed[name], abs=1e-3)
    assert run.data.metrics["linear_paper_top1_best"] >= run.data.metrics["linear_paper_top1_last"]
    # The logged kNN is the checkpoint encoder's, computed here from its definition: weighted kNN (k 10,
    # t 0.1) over cosine similarities of the backbone features of the normalised 28 px images.
    # One query of the 200 is 0.5 points; 1e-3 leaves room for the float32 mean only.
    assert run.data.metrics["knn_top1"] == pytest.approx(knn_top1_by_hand(ckpt, small_fashion_mnist), abs=1e-3)
    assert run.data.metrics["knn_top5"] >= run.data.metrics["knn_top1"] > 10  # a random encoder beats chance
    tags = run.data.tags
    assert "linear (paper, cifar recipe)" in tags["unmix.protocol.linear_paper"]
    assert "2 epochs, batch 32" in tags["unmix.protocol.linear_paper"]
    assert tags["unmix.protocol.knn"].startswith("weighted kNN k=10")
    assert tags["unmix.protocol.linear_paper"].endswith("last pretraining epoch")
    history = MlflowClient(uri).get_metric_history(run_id, "linear_paper_top1_last")
    assert [m.step for m in history] == [2]  # the checkpoint's pretraining epoch


def test_fast_protocol_from_a_checkpoint_path_printed_only(finished_run, monkeypatch, capsys):
    uri, run_id, ckpt = finished_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = load_job("linear_eval")
    assert job.main(["--checkpoint", str(ckpt / "state.pt"), "--no-log", "--set", "eval.linear_epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "linear (fast)" in out and "2 epochs" in out and '"linear_top1"' in out
    assert "linear_top1" not in MlflowClient(uri).get_run(run_id).data.metrics


def test_a_run_without_a_checkpoint_is_an_error(finished_run, monkeypatch, capsys):
    uri, run_id, _ = finished_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    MlflowClient(uri).delete_tag(run_id, tracking.TAG_CHECKPOINT)
    assert load_job("linear_eval").main(["--run-id", run_id]) == 2
    assert "unmix.checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_a_checkpoint_in_s3_storage_is_read(finished_run, tmp_path, monkeypatch):
    import boto3

    from unmix_ray.checkpoint import read as read_checkpoint

    from .services import S3_ENV, moto_s3

    _, run_id, ckpt = finished_run
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    with moto_s3(tmp_path) as endpoint:
        boto3.client("s3", endpoint_url=endpoint).upload_file(str(ckpt / "state.pt"), "unmix-test",
                                                              "ray/s-1--trial/checkpoint/epoch=0002/state.pt")
        state = read_checkpoint("s3://unmix-test/ray/s-1--trial/checkpoint/epoch=0002", endpoint_url=endpoint)
    assert state["run_id"] == run_id and state["epoch"] == 2
    assert torch.equal(state["model"]["backbone.stem.0.weight"], torch.load(ckpt / "state.pt")["model"][
        "backbone.stem.0.weight"])
