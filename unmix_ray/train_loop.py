"""The Ray Train loop run by every worker: pretrain one method with (or without) Un-Mix, then evaluate.

Per step: uint8 batch -> device -> two batched augmented views -> mixture of view 0 -> method forward
(Un-Mix objective) -> backward -> step. Loss sums stay on the device; the host reads them once per
epoch. Random streams (augmentation, mixture, batch order) are re-seeded from (seed, rank, epoch) at
every epoch start, so a run resumed from an epoch checkpoint continues exactly as it would have.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from unmix_ray.augment import BatchAugment
from unmix_ray.config import TrialConfig
from unmix_ray.data import image_loader
from unmix_ray.methods import build_method
from unmix_ray.methods.base import SSLMethod
from unmix_ray.models import build_backbone
from unmix_ray.optim import build_optimizer, build_scheduler, scaled_lr
from unmix_ray.tracking import RunLogger
from unmix_ray.trial_eval import final_evaluation, monitor_knn
from unmix_ray.unmix import MixtureSampler

CHECKPOINT_FILE = "state.pt"


def epoch_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, rank, epoch, stream]).generate_state(1)[0])


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


class NonFiniteLossError(FloatingPointError):
    pass


@dataclass
class Pretrainer:
    """One method's optimisation step, applied batch after batch: augment twice, mix view 0, forward the
    Un-Mix objective, step. Shared by the Ray Train loop and the benchmarks, so both time the same code."""

    model: torch.nn.Module  # the method, possibly wrapped (DDP) or compiled
    method: SSLMethod
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: BatchAugment
    precision: str = "fp32"
    channels_last: bool = False
    nan_check_every: int = 50

    def epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], mixer: MixtureSampler,
              device: torch.device, step0: int = 0, total_steps: int = 1, where: str = "") -> torch.Tensor:
        """Train over ``batches`` of (uint8 images, labels); return the mean (total, clean, mixed) loss as
        a device tensor. Raises NonFiniteLossError naming the step (``where`` says the rest)."""
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.train()
        sums = torch.zeros(3, device=device)
        first_bad = torch.full((), -1, device=device)  # first step with a non-finite loss, kept on the device
        n = len(batches)
        for step, (images, _) in enumerate(batches):
            x = images.to(device, non_blocking=True)
            x0 = self.augment(x).contiguous(memory_format=memory_format)
            x1 = self.augment(x).contiguous(memory_format=memory_format)
            mixture = mixer(x0)
            with autocast:
                out = self.model(x0, x1, mixture)
            self.optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            self.optimizer.step()
            self.scheduler.step()
            self.method.after_step((step0 + step + 1) / total_steps)
            parts = torch.stack([out.total.detach(), out.clean.detach(), out.mixed.detach()]).float()
            sums += parts
            first_bad = torch.where((first_bad < 0) & ~parts.isfinite().all(), step, first_bad)
            if (step + 1) % self.nan_check_every == 0 or step + 1 == n:
                if dist.is_available() and dist.is_initialized():  # every rank stops together, none hangs
                    dist.all_reduce(first_bad, op=dist.ReduceOp.MAX)
                bad = int(first_bad.item())  # a host sync every nan_check_every steps only
                if bad >= 0:
                    raise NonFiniteLossError(f"non-finite loss at {where}step {bad + 1}")
        return sums / max(1, n)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    trial = TrialConfig.from_dict(config["trial"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tc = trial.train
    if tc.torch_threads:
        torch.set_num_threads(tc.torch_threads)
    device = ray.train.torch.get_device()
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None

    batches = image_loader(trial.dataset, trial.dataset.pretrain_splits, tc.batch_per_worker, mode="pretrain",
                           seed=trial.seed, rank=rank, world_size=world)
    torch.manual_seed(trial.seed)  # identical initialisation on every rank
    method = build_method(trial.method, build_backbone(tc.backbone, trial.dataset.channels)).to(device)
    if tc.channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, trial.method.optim, tc.batch_size)
    scheduler = build_scheduler(optimizer, trial.method.optim, len(batches), tc.epochs, tc.batch_size)
    start_epoch = restore(method, optimizer, scheduler, device)
    # Buffers are not re-broadcast each step: BN statistics stay per rank (rank 0's are evaluated and
    # checkpointed) and method state such as the MoCo queue is kept identical by construction.
    model = (ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"broadcast_buffers": False})
             if world > 1 else method)
    if tc.compile:
        model = torch.compile(model)
    augment_gen = torch.Generator(device=device)
    augment = BatchAugment(trial.dataset.augment, trial.dataset.crop_size, trial.dataset.mean,
                           trial.dataset.std, augment_gen)
    trainer = Pretrainer(model, method, optimizer, scheduler, augment, tc.precision, tc.channels_last,
                         tc.nan_check_every)

    total_steps = max(1, len(batches) * tc.epochs)
    for epoch in range(start_epoch, tc.epochs):
        augment_gen.manual_seed(epoch_seed(trial.seed, rank, epoch, 0))
        mixer = MixtureSampler(trial.mixture, seed=epoch_seed(trial.seed, rank, epoch, 1))
        start = time.perf_counter()
        batches.set_epoch(epoch)
        try:
            mean_loss = trainer.epoch(batches, mixer, device, epoch * len(batches), total_steps,
                                      where=f"epoch {epoch + 1}, ")
        except NonFiniteLossError as e:
            message = f"{e} of {trial.run_name}"
            if logger:
                logger.set_tags({"unmix.error": message})
            raise NonFiniteLossError(message) from None
        elapsed = time.perf_counter() - start
        loss = _mean_over_ranks(mean_loss).tolist()
        metrics = {
            "loss": loss[0], "loss_clean": loss[1], "loss_mixed": loss[2],
            "lr": scheduler.get_last_lr()[0], "lr_scaled": scaled_lr(trial.method.optim, tc.batch_size),
            "images_per_s": len(batches) * tc.batch_size / elapsed, "epoch": epoch + 1,
        }
        last = epoch + 1 == tc.epochs
        if trial.eval.knn_every and (epoch + 1) % trial.eval.knn_every == 0:
            knn = monitor_knn(method, trial, device)  # every rank extracts a shard; rank 0 scores
            if knn is not None:
                metrics["monitor_knn_top1"] = knn
        if last:
            # The final evaluation rides on the last epoch's report, so a scheduler deciding on that
            # report (ASHA at a rung) never cuts a finished training off before its numbers exist.
            metrics |= final_evaluation(method, trial, device, logger)
        ckpt = None
        if rank == 0 and ((epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == tc.epochs):
            ckpt = save_checkpoint(method, optimizer, scheduler, epoch + 1, config)
        if logger:
            logger.log(metrics, step=epoch + 1)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch={epoch + 1:04d}" if ckpt else None,
                         delete_local_checkpoint_after_upload=True)

    if start_epoch >= tc.epochs:  # nothing to train: the untrained reference, or restored after the end
        final: dict[str, Any] = {"epoch": tc.epochs} | final_evaluation(method, trial, device, logger)
        ckpt = None
        if rank == 0:
            if tc.epochs == 0:  # keep the initial weights, for re-evaluation
                ckpt = save_checkpoint(method, optimizer, scheduler, 0, config)
        ray.train.report(final, checkpoint=ckpt, checkpoint_dir_name="epoch=0000" if ckpt else None,
                         delete_local_checkpoint_after_upload=True)
    if logger and not logger.flush(wait_s=600):
        raise RuntimeError(f"MLflow unreachable for 10 minutes; {len(logger.pending)} metrics not logged")


def save_checkpoint(method: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
                    config: dict[str, Any]) -> ray.train.Checkpoint:
    """Everything needed to continue: method state (incl. queues, momentum encoders, prototypes),
    optimiser, schedule, epoch, and the MLflow run id. RNG streams need no state: they are re-seeded
    from (seed, rank, epoch) at every epoch start."""
    ckpt_dir = tempfile.mkdtemp(prefix="unmix-ckpt-")
    torch.save({"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "run_id": config.get("run_id"),
                "trial": config["trial"]}, os.path.join(ckpt_dir, CHECKPOINT_FILE))
    return ray.train.Checkpoint.from_directory(ckpt_dir)


def restore(method: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            device: torch.device) -> int:
    """Load Ray Train's latest checkpoint (after a worker/node failure or a resumed run); the epoch to
    start from."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=False)
    method.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"]
