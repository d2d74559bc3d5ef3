"""Batch normalisation over other batches than one worker's: global BN across workers, and split BN.

- Global BN (``global_batchnorm``): every BatchNorm normalises with the mean and variance of the
  *global* batch, as the SimCLR, BYOL and SwAV references do on many devices. On GPUs it is torch's
  ``nn.SyncBatchNorm``; that module refuses CPU tensors, so on the CPU (gloo) ``GlobalBatchNorm``
  computes the same statistics: the batch sum and the centred sum of squares are all-reduced with
  gradients, so the forward pass, the backward pass and the running statistics are those of one
  BatchNorm over the concatenated batch.
- Split BN (``split_batchnorm``, the Un-Mix/MoCo CIFAR code's ``bn_splits``): on one device, each
  BatchNorm2d normalises ``splits`` interleaved sub-batches separately (sample n falls in split
  ``n mod splits``), imitating as many devices' shuffle-BN; the running statistics are the mean over
  splits, and evaluation uses plain BN. Reversing a batch whose size is a multiple of ``splits`` maps
  split k onto split ``splits - 1 - k``, so Un-Mix's ``flip(embed(mix)) == embed(flip(mix))`` holds.

``running_stats`` lists the running statistics that evaluation reads, for ``collectives.average_buffers``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from unmix_ray.collectives import all_reduce_with_grad, is_distributed

Setting = bool | str  # True, False or "auto" (TrainConfig.sync_bn)


def _momentum(bn: _BatchNorm) -> float:
    """The weight of this batch in the running statistics, counting the batch, as _BatchNorm does
    (``momentum=None``: the cumulative average)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def _uses_batch_stats(bn: _BatchNorm) -> bool:
    return bn.training or bn.running_mean is None


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the batches of every rank (any input [N, C, ...]); plain BatchNorm on one process.

    Two all-reduces per call (the sum, then the sum of squares about the global mean: the two-pass
    variance, free of the cancellation of ``E[x^2] - E[x]^2``), both differentiable, so each rank's
    gradient is that of the global batch's loss. Ranks may hold different batch sizes.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input [N, C, ...], got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (_uses_batch_stats(self) and is_distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.new_full((1,), x.numel() // x.shape[1])
        totals = all_reduce_with_grad(torch.cat([xf.sum(dims), count]))
        n = totals[-1]
        mean = totals[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce_with_grad(centred.square().sum(dims)) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                m = _momentum(self)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * (n / (n - 1).clamp_min(1)), m)  # unbiased, as BN keeps it
        return out.to(x.dtype)


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d over ``splits`` interleaved sub-batches in training (sample n in split ``n mod
    splits``); running statistics are the mean over the splits; eval mode is plain BatchNorm2d."""

    def __init__(self, num_features: int, splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.splits = splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, splits={self.splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _uses_batch_stats(self) or self.splits == 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, c, h, w = x.shape
        s = self.splits
        if n % s:
            raise ValueError(f"split BatchNorm: a batch of {n} does not divide into {s} splits (bn_splits); "
                             f"use a per-worker batch that is a multiple of {s}")
        track = self.training and self.track_running_stats
        m = _momentum(self) if track else 0.0
        # [N, C, H, W] -> [N / s, s * C, H, W]: sample a * s + b lands in channel block b, i.e. split b.
        running = (self.running_mean.repeat(s), self.running_var.repeat(s)) if track else (None, None)
        weight = self.weight.repeat(s) if self.affine else None
        bias = self.bias.repeat(s) if self.affine else None
        out = F.batch_norm(x.reshape(n // s, s * c, h, w), *running, weight, bias, True, m, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(running[0].view(s, c).mean(0))
                self.running_var.copy_(running[1].view(s, c).mean(0))
        return out.reshape(n, c, h, w)


def _replace(module: nn.Module, match: Callable[[nn.Module], bool],
             make: Callable[[_BatchNorm], _BatchNorm]) -> nn.Module:
    """``module`` with every BatchNorm that ``match``es swapped for ``make(bn)``, which takes over its
    parameters (the same Parameter objects: optimisers and requires_grad flags still hold) and buffers."""
    if match(module):
        new = make(module)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = _replace(child, match, make)
        if replaced is not child:
            module.add_module(name, replaced)
    return module


def _settings(bn: _BatchNorm) -> dict:
    return {"eps": bn.eps, "momentum": bn.momentum, "affine": bn.affine,
            "track_running_stats": bn.track_running_stats,
            "device": bn.weight.device if bn.affine else None, "dtype": bn.weight.dtype if bn.affine else None}


def split_batchnorm(module: nn.Module, splits: int) -> nn.Module:
    """``module`` with its BatchNorm2d layers split into ``splits`` sub-batches (``splits`` 1: unchanged)."""
    if splits == 1:
        return module
    return _replace(module, lambda m: type(m) is nn.BatchNorm2d,
                    lambda bn: SplitBatchNorm(bn.num_features, splits, **_settings(bn)))


def global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm global over the ranks: torch's SyncBatchNorm on CUDA,
    ``GlobalBatchNorm`` elsewhere. Split BN cannot also be global: it is refused."""
    if any(isinstance(m, SplitBatchNorm) and m.splits > 1 for m in module.modules()):
        raise ValueError("split BatchNorm (bn_splits > 1) cannot also be global across workers (sync_bn)")
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace(module, lambda m: isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm),
                    lambda bn: GlobalBatchNorm(bn.num_features, **_settings(bn)))


def wants_global_bn(setting: Setting, method_default: bool, world_size: int) -> bool:
    """Whether a run converts to global BN: ``"auto"`` follows the method's reference
    (``SSLMethod.global_bn``), only with more than one worker (one worker's BN is already global)."""
    if world_size <= 1:
        return False
    return method_default if setting == "auto" else bool(setting)


def running_stats(module: nn.Module) -> list[torch.Tensor]:
    """The running means and variances of every BatchNorm in ``module``: what eval mode reads."""
    return [t for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats
            for t in (m.running_mean, m.running_var)]
