"""The training step of every method, applied batch after batch: augment twice, mix view 0, forward the
Un-Mix objective, step. The Ray Train loop, the benchmarks and the GPU check all run this code.

Per step: uint8 batch -> device -> two batched augmented views -> mixture of view 0 -> method forward
(Un-Mix objective) -> backward -> step. Loss sums stay on the device; the host reads them once per
epoch, and checks for a non-finite loss every ``nan_check_every`` steps (one sync each).

A batch is either images [B, C, H, W], from which both views are cropped on the device, or two views
[B, 2, C, S, S] cropped by the loader (streamed ImageNet crops each from the whole image in its
workers), which get the rest of the recipe without a second crop.

``build_training`` and ``Pretrainer.for_trial`` / ``train_epoch`` are how a run builds its objects and
trains an epoch; the Ray Train loop calls them, and so does the exact-resume test, so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from unmix_ray.augment import BatchAugment
from unmix_ray.collectives import average_buffers, max_over_ranks
from unmix_ray.config import MixtureConfig, TrialConfig
from unmix_ray.data.loader import MemoryBatches, StreamBatches
from unmix_ray.methods import build_method
from unmix_ray.methods.base import SSLMethod
from unmix_ray.models import build_backbone
from unmix_ray.norm import global_batchnorm, running_stats, wants_global_bn
from unmix_ray.optim import build_optimizer, build_scheduler
from unmix_ray.unmix import MixtureSampler


def epoch_seed(seed: int, rank: int, epoch: int, stream: int) -> int:
    """The seed of one random stream (augmentation, mixture, ...) of one rank in one epoch, so a run
    resumed from an epoch checkpoint draws exactly what the uninterrupted run would have."""
    return int(np.random.SeedSequence([seed, rank, epoch, stream]).generate_state(1)[0])


class NonFiniteLossError(FloatingPointError):
    pass


def build_training(trial: TrialConfig, steps_per_epoch: int, device: torch.device, world_size: int
                   ) -> tuple[SSLMethod, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """A run's method, optimiser and schedule, built alike on every rank (from ``trial.seed``)."""
    tc = trial.train
    torch.manual_seed(trial.seed)  # identical initialisation on every rank
    method = build_method(trial.method, build_backbone(tc.backbone, trial.dataset.channels)).to(device)
    if wants_global_bn(tc.sync_bn, method.global_bn, world_size):  # before the optimiser and DDP see the modules
        method = global_batchnorm(method, device)
    if tc.channels_last:
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, trial.method.optim, tc.batch_size)
    scheduler = build_scheduler(optimizer, trial.method.optim, steps_per_epoch, tc.epochs, tc.batch_size)
    return method, optimizer, scheduler


@dataclass
class Pretrainer:
    """One method's optimisation step, applied to every batch of an epoch."""

    model: torch.nn.Module  # the method, possibly wrapped (DDP) or compiled
    method: SSLMethod
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    augment: BatchAugment
    precision: str = "fp32"
    channels_last: bool = False
    nan_check_every: int = 50

    @classmethod
    def for_trial(cls, trial: TrialConfig, model: torch.nn.Module, method: SSLMethod,
                  optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                  device: torch.device) -> Pretrainer:
        """The trial's step: its dataset's augmentation (own generator on ``device``) and precision."""
        ds, tc = trial.dataset, trial.train
        augment = BatchAugment(ds.augment, ds.crop_size, ds.mean, ds.std, torch.Generator(device=device))
        return cls(model, method, optimizer, scheduler, augment, tc.precision, tc.channels_last, tc.nan_check_every)

    def train_epoch(self, batches: MemoryBatches | StreamBatches, mixture: MixtureConfig, seed: int, rank: int,
                    epoch: int, device: torch.device, total_steps: int, where: str = "") -> torch.Tensor:
        """Epoch ``epoch`` of a run: the random streams (augmentation, mixture, batch order) re-seeded from
        (seed, rank, epoch), so a run resumed from an epoch checkpoint draws what the uninterrupted run
        would have; then ``epoch`` over the batches, then BatchNorm running statistics averaged over the
        ranks (each rank updates its own), so evaluations and checkpoints see one network."""
        self.augment.g.manual_seed(epoch_seed(seed, rank, epoch, 0))
        mixer = MixtureSampler(mixture, seed=epoch_seed(seed, rank, epoch, 1))
        batches.set_epoch(epoch)
        mean_loss = self.epoch(batches, mixer, device, epoch * len(batches), total_steps, where)
        average_buffers(running_stats(self.method))
        return mean_loss

    def epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], mixer: MixtureSampler,
              device: torch.device, step0: int = 0, total_steps: int = 1, where: str = "") -> torch.Tensor:
        """Train over ``batches`` of (uint8 images or view pairs, labels); return the mean (total, clean,
        mixed) loss as a device tensor. Raises NonFiniteLossError naming the step (``where`` says the rest)."""
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.train()
        sums = torch.zeros(3, device=device)
        first_bad = torch.full((), -1, device=device)  # first step with a non-finite loss, kept on the device
        n = len(batches)
        for step, (images, _) in enumerate(batches):
            x = images.to(device, non_blocking=True)
            if x.ndim == 5:  # two views, cropped already
                x0 = self.augment(x[:, 0], crop=False).contiguous(memory_format=memory_format)
                x1 = self.augment(x[:, 1], crop=False).contiguous(memory_format=memory_format)
            else:
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
                bad = int(max_over_ranks(first_bad).item())  # every rank stops together; one sync per check
                if bad >= 0:
                    raise NonFiniteLossError(f"non-finite loss at {where}step {bad + 1}")
        return sums / max(1, n)
