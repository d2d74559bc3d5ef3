"""The shared shape of every SSL method: a backbone, the method's heads, and the Un-Mix objective.

A method file subclasses ``SSLMethod``: it declares its ``Params`` dataclass (validated from
``configs/methods/<name>.yaml``), builds its heads, and defines ``outputs(x)`` (what one view
yields) and ``loss(a, b)`` (its base loss between two views' outputs). The mixture and its
weighting come from ``unmix_objective``, written once. Methods with a momentum encoder or a queue
also override ``forward`` or ``after_step``; ``mix_outputs`` lets a method give the mixture a
different output than a clean view (BYOL can keep it out of the target branch).

Evaluation reads ``features`` (the backbone: linear protocols) and ``knn_features`` (the kNN
monitor and final kNN: the backbone too, unless the method's reference monitored another output,
as MoCo's did; ``knn_representation`` names it in the protocol string). ``global_bn`` says whether
the method's reference normalises with global-batch statistics when it runs on several workers
(``TrainConfig.sync_bn: auto``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from unmix_ray.unmix import Mixture, UnmixLoss, unmix_objective


class SSLMethod(nn.Module):
    Params: ClassVar[type]
    global_bn: ClassVar[bool] = True  # SimCLR, BYOL and SwAV use SyncBN across devices

    def __init__(self, backbone: nn.Module, params: Any):
        super().__init__()
        self.backbone = backbone
        self.params = params

    def outputs(self, x: torch.Tensor) -> Any:
        raise NotImplementedError

    def mix_outputs(self, x: torch.Tensor) -> Any:
        """What the mixed batch yields; by default the same as a clean view."""
        return self.outputs(x)

    def loss(self, a: Any, b: Any) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, mixture: Mixture | None = None) -> UnmixLoss:
        out0, out1 = self.outputs(x0), self.outputs(x1)
        # The mixed batch gets its own forward pass (its own BN statistics), as in the paper.
        out_mix = self.mix_outputs(mixture.images) if mixture is not None else None
        return unmix_objective(self.loss, out0, out1, out_mix, mixture.lam if mixture is not None else 1.0)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Called after each optimiser step with training progress in [0, 1] (momentum updates)."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features used by linear evaluation (and by kNN unless ``knn_head`` says otherwise)."""
        return self.backbone(x)

    def knn_head(self, features: torch.Tensor) -> torch.Tensor:
        """The kNN representation from backbone ``features`` (per sample, so it may be applied to
        features extracted earlier): by default the features themselves."""
        return features

    def knn_features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation the kNN monitor and final kNN use."""
        return self.knn_head(self.features(x))

    @property
    def knn_representation(self) -> str:
        """What ``knn_features`` returns, in the words of the kNN protocol string."""
        return "frozen backbone features"

    @classmethod
    def config_problems(cls, params: dict[str, Any], sync_bn: bool | str, batch_per_worker: int) -> list[str]:
        """What is wrong with running the validated ``params`` with this training setup (checked when a
        sweep is composed)."""
        splits = params.get("bn_splits", 1)
        out = []
        if batch_per_worker % splits:
            out.append(f"bn_splits {splits} does not divide the per-worker batch {batch_per_worker}")
        if splits > 1 and sync_bn is True:
            out.append(f"bn_splits {splits} (split BN) cannot be combined with sync_bn: true (global BN)")
        return out


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that takes no gradient: a momentum (EMA) encoder's starting point.
    Its weights stay parameters, so they are in ``state_dict`` and move with ``.to()``."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online``, parameter by parameter.
    BatchNorm running statistics are not averaged: each encoder keeps its own."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - momentum)
