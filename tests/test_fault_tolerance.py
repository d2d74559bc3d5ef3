"""Losing a worker or a node loses no finished epoch and never splits an MLflow run (the sweep driver:
tests/test_interruptions.py).

A simulated 2-node cluster (``ray.cluster_utils.Cluster``): Ray Train's FailureConfig restarts the
worker group, which resumes from the last checkpoint (kept in a moto S3 server on loopback).
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from mlflow.tracking import MlflowClient

from unmix_ray.compose import load_sweep
from unmix_ray.config import AugmentConfig, MethodConfig, MixtureConfig

from .conftest import ROOT
from .mlflow_checks import assert_one_complete_run, epochs_logged, wait_for
from .services import S3_ENV, moto_s3, s3_keys

EPOCHS = 6  # room for a fault after epoch 2 and another after epoch 4


def _loop(config: dict) -> None:
    """A few DDP steps from different initial weights and data per rank: parameters must end identical."""
    import ray.train
    import ray.train.torch

    from unmix_ray.augment import BatchAugment
    from unmix_ray.methods import build_method
    from unmix_ray.models import NarrowResNet
    from unmix_ray.unmix import MixtureSampler

    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(100 + rank)  # different initial weights per rank: DDP must broadcast rank 0's
    method = build_method(MethodConfig(**config["method"]), NarrowResNet(1, width=8))
    initial = torch.cat([p.detach().flatten().clone() for p in method.parameters()])
    model = ray.train.torch.prepare_model(method)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(rank)
    augment = BatchAugment(AugmentConfig(jitter=(0.4, 0.4, 0, 0), gray_p=0), 16, (0.5,), (0.25,), g)
    mixer = MixtureSampler(MixtureConfig(type="both"), seed=rank)  # each rank mixes its own batch, its own draw
    for _ in range(config["steps"]):
        x = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8, generator=g)  # different data per rank
        x0, x1 = augment(x), augment(x)
        out = model(x0, x1, mixer(x0))
        opt.zero_grad()
        out.total.backward()
        opt.step()
    final = torch.cat([p.detach().flatten() for p in method.parameters()])
    torch.save({"initial": initial, "final": final}, f"{config['out']}/rank{rank}.pt")
    ray.train.report({"loss": out.total.item()})


SMALL = [
    "grid.mixture=[both]", "grid.seed=[0]", "untrained_reference=false", f"train.epochs={EPOCHS}",
    "train.batch_size=64",
    "train.num_workers=2", "train.torch_threads=1", "train.checkpoint_every=1",  # max_failures: the default
    "datasets.fashion_mnist.train_subset=512", "datasets.fashion_mnist.test_subset=300",
    "eval.linear_epochs=1", "eval.knn_k=20", "eval.knn_every=0",
]


@pytest.fixture(scope="module")
def two_nodes():
    """One simulated cluster for the module (its start is the slow part); the fault test, which replaces
    the worker node, runs last."""
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**S3_ENV, "PYTHONPATH": str(ROOT)}.items():
            mp.setenv(k, v)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"trial_driver": 4}})
        worker = cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        yield cluster, worker
        ray.shutdown()
        cluster.shutdown()


def run_in_thread(sweep, uri):
    from unmix_ray.orchestration.sweep import run_sweep

    box = {}

    def target():
        try:
            box["table"] = run_sweep(sweep, uri)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    thread = threading.Thread(target=target)  # Cluster.add_node must stay on the main thread
    thread.start()
    return thread, box


def training_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if "TrainWorker" in (a.class_name or "")]


@pytest.mark.slow
@pytest.mark.ray
def test_parameters_identical_across_nodes(two_nodes, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    method = {"name": "simclr", "params": {"temperature": 0.5, "proj_hidden": 32, "proj_dim": 16}}
    TorchTrainer(
        _loop, train_loop_config={"method": method, "steps": 3, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}, placement_strategy="SPREAD"),
        run_config=RunConfig(name="sync2", storage_path=str(tmp_path / "ray")),
    ).fit()
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert not torch.equal(r0["initial"], r1["initial"]) and torch.equal(r0["final"], r1["final"])


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_worker_and_a_lost_node_each_resume_into_the_same_run(two_nodes, tmp_path, small_fashion_mnist):
    """One trial, two faults: a training worker SIGKILLed after epoch 2, then its node lost after epoch 4
    (the replacement node comes up as the autoscaler's would). Each restart resumes from the last S3
    checkpoint; the run is one MLflow run with every epoch once."""
    cluster, worker = two_nodes
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with moto_s3(tmp_path, "ckpt") as endpoint:
        sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", SMALL + [
            f"datasets.fashion_mnist.root={small_fashion_mnist}", "tune.storage_path=s3://ckpt/runs",
            f"tune.storage_endpoint_url={endpoint}"])
        name = sweep.trials[0].run_name
        assert sweep.trials[0].train.max_failures == 2  # what a user gets without asking: both faults fit
        thread, box = run_in_thread(sweep, uri)
        wait_for(lambda: len(epochs_logged(uri, name)) >= 2 or not thread.is_alive(), 600, "epoch 2")
        pids = training_worker_pids()
        assert pids, "no training worker found"
        os.kill(pids[-1], signal.SIGKILL)
        wait_for(lambda: len(epochs_logged(uri, name)) >= 4 or not thread.is_alive(), 600, "epoch 4")
        assert thread.is_alive(), "the trial ended before its node could be lost"
        cluster.remove_node(worker, allow_graceful=False)
        cluster.add_node(num_cpus=1)  # the replacement node the autoscaler would bring
        thread.join(900)
        assert "error" not in box, box.get("error")
        assert box["table"].complete
        assert_one_complete_run(uri, name, EPOCHS)
        keys = s3_keys(endpoint, "ckpt", "runs/")
        assert any("/checkpoint_" in k or "epoch=" in k for k in keys), keys[:20]
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("unmix-ray").experiment_id],
                                 f"tags.`unmix.trial` = '{name}'")[0]
        assert run.data.tags["unmix.checkpoint"].startswith("s3://ckpt/runs/")
