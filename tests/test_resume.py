"""Exact resume: N epochs straight, or N/2 epochs, a checkpoint, fresh objects restored from it and N/2
more, end in bitwise the same state (weights, method buffers such as the MoCo queue and its shuffle
counter, BatchNorm statistics, optimiser and schedule). Both runs go through the library path the Ray
Train loop runs (``build_training``, ``Pretrainer.for_trial`` / ``train_epoch`` with its per-epoch
re-seeding, ``checkpoint.write / read / load_into``), on one process and on two gloo processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from unmix_ray import checkpoint
from unmix_ray.compose import load_sweep
from unmix_ray.config import TrialConfig
from unmix_ray.data import image_loader
from unmix_ray.methods import METHODS
from unmix_ray.step import Pretrainer, build_training

from .conftest import ROOT
from .test_methods_distributed import spawn

EPOCHS = 2
CPU = torch.device("cpu")


def make_trial(method: str, workers: int = 1, **params: Any) -> TrialConfig:
    """A Fashion-MNIST trial (64 test-split images, 16 per worker step: 4 steps an epoch on one process) with Un-Mix
    drawing mixup and CutMix, and the method's recipe with ``params`` on top (small queues)."""
    overrides = [f"grid.method=[{method}]", "grid.mixture=[both]", "grid.seed=[0]", "untrained_reference=false",
                 f"train.epochs={EPOCHS}", f"train.num_workers={workers}", f"train.batch_size={16 * workers}",
                 "datasets.fashion_mnist.pretrain_splits=[test]", "datasets.fashion_mnist.train_subset=64"]
    overrides += [f"methods.{method}.params.{k}={v}" for k, v in params.items()]
    (trial,) = load_sweep(ROOT / "configs/sweeps/demo.yaml", overrides).trials
    return trial


def train(trial: TrialConfig, epochs: range, rank: int = 0, world: int = 1,
          resume_from: Path | None = None, save_to: Path | None = None) -> dict[str, Any]:
    """What ``unmix_ray.train.loop.train_loop_per_worker`` does for ``epochs``, without Ray: build (and
    restore), wrap in DDP on several processes, train epoch by epoch, checkpoint on rank 0."""
    tc = trial.train
    batches = image_loader(trial.dataset, trial.dataset.pretrain_splits, tc.batch_per_worker, mode="pretrain",
                           seed=trial.seed, rank=rank, world_size=world)
    method, optimizer, scheduler = build_training(trial, len(batches), CPU, world)
    if resume_from is not None:
        state = checkpoint.read(resume_from / checkpoint.CHECKPOINT_FILE)
        assert checkpoint.load_into(state, method, optimizer, scheduler) == epochs.start
    model = DistributedDataParallel(method, broadcast_buffers=False) if world > 1 else method
    trainer = Pretrainer.for_trial(trial, model, method, optimizer, scheduler, CPU)
    for epoch in epochs:
        trainer.train_epoch(batches, trial.mixture, trial.seed, rank, epoch, CPU, len(batches) * tc.epochs)
    if save_to is not None and rank == 0:
        checkpoint.write(method, optimizer, scheduler, epochs.stop, None, trial.to_dict(), save_to)
    return {"model": method.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def assert_bitwise_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def straight_and_resumed(trial: TrialConfig, folder: Path, rank: int = 0, world: int = 1
                         ) -> tuple[dict[str, Any], dict[str, Any]]:
    straight = train(trial, range(EPOCHS), rank, world)
    half = EPOCHS // 2
    train(trial, range(half), rank, world, save_to=folder)
    if world > 1:
        dist.barrier()  # rank 0's checkpoint is written before anyone reads it
    resumed = train(trial, range(half, EPOCHS), rank, world, resume_from=folder)
    return straight, resumed


# MoCo with split BN shuffles keys on one process too; SwAV counts its steps in extra state.
ONE_PROCESS = {name: {"queue_size": 48, "bn_splits": 2} if name.startswith("moco") else {} for name in METHODS}
ONE_PROCESS["swav"] = {"freeze_prototypes_iters": 6}  # the prototypes start moving in the resumed half


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_resumed_run_ends_bitwise_where_the_straight_run_does(name, tmp_path):
    trial = make_trial(name, **ONE_PROCESS[name])
    straight, resumed = straight_and_resumed(trial, tmp_path)
    assert_bitwise_equal(resumed, straight)
    if name.startswith("moco"):  # the queue (48) wrapped around; the shuffle was drawn at every step
        assert int(resumed["model"]["shuffle_count"]) == EPOCHS * 4


def _two_process_moco(rank: int, folder: str) -> None:
    trial = make_trial("moco_v1", workers=2, queue_size=48)
    straight, resumed = straight_and_resumed(trial, Path(folder), rank, 2)
    assert_bitwise_equal(resumed, straight)
    assert int(resumed["model"]["shuffle_count"]) == EPOCHS * 2  # 32 images a rank an epoch, 16 a step
    for key in ("queue", "queue_ptr", "shuffle_count", "backbone.stem.0.weight", "key_backbone.stem.0.weight"):
        parts = [torch.empty_like(resumed["model"][key]) for _ in range(2)]
        dist.all_gather(parts, resumed["model"][key])
        assert torch.equal(parts[0], parts[1]), key  # and every rank holds the same


def test_a_resumed_two_process_moco_run_ends_bitwise_where_the_straight_run_does(tmp_path):
    spawn(_two_process_moco, str(tmp_path))
