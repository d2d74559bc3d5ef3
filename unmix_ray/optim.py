"""Optimisers and per-step learning-rate schedules (linear warm-up, then cosine, constant or step).

``lars`` is SGD with momentum under layer-wise adaptive rate control (LARC, as SwAV trains with it).
Weight decay applies to every parameter unless the recipe sets ``wd_exclude_norm_bias`` (see
``OptimConfig``). A model may name parameters whose gradient is dropped before an optimiser step
(``frozen_parameters()``, e.g. SwAV's prototypes early in training): they then do not move at all,
neither by their gradient nor by weight decay or momentum.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from unmix_ray.config import OptimConfig


def scaled_lr(config: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: the recipe's lr is stated for ``base_batch_size``."""
    return config.lr * global_batch / config.base_batch_size


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_bias: bool = False) -> list[dict]:
    """The trainable parameters as optimiser groups: one group decayed by ``weight_decay``, or with
    ``exclude_norm_bias`` two, the 1-d tensors (biases, normalisation scales and shifts) undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    lr = scaled_lr(config, global_batch)
    groups = param_groups(model, config.weight_decay, config.wd_exclude_norm_bias)
    if config.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    elif config.name == "adam":
        optimizer = torch.optim.Adam(groups, lr=lr)
    elif config.name == "lars":
        optimizer = LARS(groups, lr=lr, momentum=config.momentum)
    else:
        raise ValueError(f"unknown optimiser {config.name!r}")
    frozen = getattr(model, "frozen_parameters", None)
    if callable(frozen):
        # A pre-step hook runs after backward and after DDP has averaged the gradients, so dropping
        # them here holds on every rank alike.
        optimizer.register_step_pre_hook(_drop_gradients_of(frozen))
    return optimizer


def _drop_gradients_of(frozen: Callable[[], Sequence[torch.Tensor]]) -> Callable[..., None]:
    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for p in frozen():
            p.grad = None  # optimisers skip a parameter without a gradient: no decay, no momentum

    return hook


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling, in LARC's form.

    You et al., "Large Batch Training of Convolutional Networks", arXiv 1708.03888; the variant SwAV
    uses (NVIDIA apex ``LARC``, trust coefficient 0.001, no clipping). For each parameter tensor
    ``w`` with gradient ``g`` and weight decay ``wd``, the update direction ``g + wd w`` is scaled by

        local_lr = trust * ||w|| / (||g|| + wd ||w|| + eps)

    (with ``clip``: by ``min(local_lr / lr, 1)``), then fed to heavy-ball momentum with the group's
    lr. A tensor whose weight or gradient norm is zero takes the plain gradient, without weight
    decay, as LARC does.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, clip: bool = False, eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, clip=clip, eps=eps)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                local_lr = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                if group["clip"]:
                    local_lr = torch.clamp(local_lr / lr, max=1.0)
                adapt = (w_norm > 0) & (g_norm > 0)
                d = torch.where(adapt, (g + wd * p) * local_lr, g)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-lr)
        return loss


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, final_ratio: float,
              milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Multiplier of the peak lr at optimiser step ``step`` (0-based): a linear warm-up to 1 over
    ``warmup_steps`` steps, then ``cosine`` from 1 down to ``final_ratio`` over the remaining steps,
    ``constant`` 1, or ``step``: ``gamma ** k`` with ``k`` the number of ``milestones`` (in steps,
    sorted) at or before ``step``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "step":
        return gamma ** bisect.bisect_right(milestones, step)
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_steps(config: OptimConfig, steps_per_epoch: int) -> int:
    """The warm-up of ``config`` in optimiser steps (``warmup_iters``, or ``warmup_epochs`` rounded)."""
    return config.warmup_iters or int(round(config.warmup_epochs * steps_per_epoch))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int, epochs: int,
                    global_batch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * epochs
    warmup = warmup_steps(config, steps_per_epoch)
    final_ratio = config.final_lr / scaled_lr(config, global_batch)
    milestones = [m * steps_per_epoch for m in config.milestones]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.schedule, final_ratio, milestones,
                                          config.gamma)
    )
