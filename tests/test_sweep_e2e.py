"""A small sweep end to end on a local Ray: Tune trials -> Train -> MLflow runs -> results table."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from unmix_ray.compose import load_sweep
from unmix_ray.orchestration.results import build_results

from .conftest import ROOT

SMALL = [
    "grid.mixture=[none, both]", "grid.seed=[0]", "train.epochs=2", "train.batch_size=64", "train.torch_threads=1",
    "eval.linear_epochs=10", "eval.knn_k=20", "tune.max_concurrent_trials=2", "tune.system_metrics_s=1",
]


@pytest.mark.slow
@pytest.mark.ray
def test_small_sweep_writes_runs_and_the_results_table(ray_local, tmp_path, small_fashion_mnist):
    import mlflow.pytorch
    import torch

    from unmix_ray.evaluation import knn_predict, split_features, topk_accuracy
    from unmix_ray.orchestration.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", SMALL + [
        f"tune.storage_path={tmp_path / 'ray'}", f"datasets.fashion_mnist.root={small_fashion_mnist}"])
    table = run_sweep(sweep, uri)

    assert table.complete
    assert list(table.rows["variant"]) == ["untrained", "none", "both@0.5"]
    knn = dict(zip(table.rows["variant"], table.rows["knn_top1"]))
    assert knn["none"] > knn["untrained"] and knn["both@0.5"] > knn["untrained"]  # pretraining taught something
    both = table.rows.iloc[2]
    assert both["delta_knn_top1"] == pytest.approx(both["knn_top1"] - table.rows.iloc[1]["knn_top1"])
    assert "kNN k=20" in both["knn_protocol"] and "linear" in both["linear_protocol"]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("unmix.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("unmix.role") == "trial"]
    assert len(parent) == 1 and len(trials) == 3
    assert {r.info.run_name for r in trials} == {
        "simclr-fashion_mnist-resnet_narrow-untrained-s0", "simclr-fashion_mnist-none-p0.5-s0",
        "simclr-fashion_mnist-both-p0.5-s0"}
    for r in trials:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id
        assert r.data.params["train.batch_size"] == "64" and r.data.params["method.name"] == "simclr"
    trained = next(r for r in trials if r.info.run_name.endswith("both-p0.5-s0"))
    assert trained.data.tags["mixture_type"] == "both" and trained.data.tags["mixture_prob"] == "0.5"
    history = client.get_metric_history(trained.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2] and history[1].value < history[0].value  # the loss falls
    assert [m.step for m in client.get_metric_history(trained.info.run_id, "monitor_knn_top1")] == [1, 2]
    assert trained.data.metrics["loss_mixed"] > 0
    artifacts = {a.path for a in client.list_artifacts(parent[0].info.run_id, "results")}
    assert {"results/results_table.csv", "results/results_table.md", "results/results_table.json"} <= artifacts

    again = build_results(uri, "unmix-ray", table.sweep_id)  # what jobs/report.py prints
    assert again.rows.equals(table.rows)

    # Lineage: the encoder is an MLflow model that reproduces the run's kNN on the same data; the run names
    # its dataset and its source, and samples the node's system metrics.
    mlflow.set_tracking_uri(uri)  # a `models:/` URI is resolved through the tracking server
    try:
        encoder = mlflow.pytorch.load_model(trained.data.tags["unmix.model"]).eval()
    finally:
        mlflow.set_tracking_uri(None)
    trial = next(t for t in sweep.trials if t.run_name == trained.info.run_name)
    ds, ev = trial.dataset, trial.eval
    with torch.no_grad():
        bank, bank_labels = split_features(encoder, ds, ds.train_split, None, 0, torch.device("cpu"), 256)
        queries, labels = split_features(encoder, ds, ds.test_split, ds.test_subset, 0, torch.device("cpu"), 256)
    top1 = topk_accuracy(knn_predict(bank, bank_labels, queries, ds.num_classes, ev.knn_k, ev.knn_t), labels)
    assert top1 == pytest.approx(trained.data.metrics["knn_top1"], abs=1e-6)
    assert trained.inputs.dataset_inputs[0].dataset.name == "fashion_mnist"
    assert len(trained.data.tags["mlflow.source.git.commit"]) == 40
    assert any(k.startswith("system/") for k in trained.data.metrics)


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_a_trial_early_and_mlflow_says_so(ray_local, tmp_path, small_fashion_mnist):
    """Sequential trials, ASHA on the training loss: the Un-Mix trial's total loss (clean + mixed terms)
    is far above the baseline's, so at the first rung ASHA stops it."""
    from unmix_ray.orchestration.sweep import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        "grid.mixture=[none, both]", "grid.seed=[0]", "untrained_reference=false", "train.epochs=4",
        "train.batch_size=64",
        f"datasets.fashion_mnist.root={small_fashion_mnist}", "datasets.fashion_mnist.train_subset=256",
        "eval.knn_every=0", "tune.log_encoder=false",
        "eval.linear_epochs=1", "eval.knn_k=20", "tune.max_concurrent_trials=1",
        "tune.asha={metric: loss, mode: min, grace_period: 1, reduction_factor: 2}",
        f"tune.storage_path={tmp_path / 'ray'}",
    ])
    table = run_sweep(sweep, uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], "tags.`unmix.role` = 'trial'")}
    baseline, mixed = runs["simclr-fashion_mnist-none-p0.5-s0"], runs["simclr-fashion_mnist-both-p0.5-s0"]
    assert baseline.info.status == "FINISHED"
    assert mixed.info.status == "KILLED"
    assert len(client.get_metric_history(mixed.info.run_id, "loss")) < 4  # stopped before its last epoch
    assert "linear_top1" not in mixed.data.metrics
    rows = table.rows.set_index("variant")
    assert rows.loc["none", "n"] == 1 and rows.loc["none", "stopped"] == 0
    assert rows.loc["both@0.5", "n"] == 0 and rows.loc["both@0.5", "stopped"] == 1  # shown as stopped
    assert pd.isna(rows.loc["both@0.5", "knn_top1"])  # and not as a result
    assert "stopped" in table.markdown()
    assert not table.complete and table.failed == 0
    sweep_run = client.search_runs([exp.experiment_id], "tags.`unmix.role` = 'sweep'")[0]
    assert sweep_run.info.status == "FINISHED"  # an early stop is an outcome, not a failure


@pytest.mark.slow
@pytest.mark.ray
def test_a_streamed_dataset_runs_through_the_sweep(ray_local, tmp_path):
    """ImageNet, the one dataset that streams (decoded in DataLoader workers, each view cropped from the
    whole image), as a tiny fixture in its original format through a sweep; the in-memory loaders are
    covered byte by byte in tests/test_datasets.py."""
    from unmix_ray.orchestration.sweep import run_sweep

    from .fixtures import write_fixture

    root = write_fixture("imagenet", tmp_path / "imagenet", n_per_class=4, num_classes=4)
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        "grid.mixture=[both]", "grid.seed=[0]", "untrained_reference=false", "train.epochs=1",
        "train.batch_size=8", "eval.linear_epochs=1", "eval.knn_k=5", "eval.knn_every=1", "grid.dataset=[imagenet]",
        f"datasets.imagenet.root={root}", "datasets.imagenet.num_classes=4", "datasets.imagenet.decode_workers=0",
        f"tune.storage_path={tmp_path / 'ray'}", "tune.system_metrics_s=0", "tune.log_encoder=false"])
    table = run_sweep(sweep, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert table.complete
    assert [r.dataset for r in table.records] == ["imagenet"]
    assert not math.isnan(table.records[0].cells["knn_top1"].mean)
