"""Optimisers and per-step learning-rate schedules (linear warm-up, then cosine or constant)."""

from __future__ import annotations

import math

import torch
from torch import nn

from unmix_ray.config import OptimConfig


def scaled_lr(config: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: the recipe's lr is stated for ``base_batch_size``."""
    return config.lr * global_batch / config.base_batch_size


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on biases and normalisation parameters (1-d tensors), as in the reference recipes.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    lr = scaled_lr(config, global_batch)
    groups = _param_groups(model, config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum)
    if config.name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimiser {config.name!r}")


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, final_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warm-up, then cosine down to ``final_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig, steps_per_epoch: int, epochs: int,
                    global_batch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = steps_per_epoch * epochs
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    final_ratio = config.final_lr / scaled_lr(config, global_batch)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config.schedule, final_ratio)
    )
