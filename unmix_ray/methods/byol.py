"""BYOL (Grill et al., NeurIPS 2020) with Un-Mix.

An online network (backbone, projector, predictor) regresses the projection of the other view made
by a target network (backbone, projector) that is an exponential moving average of the online one.
The base loss between two views is the symmetric normalised MSE,
``L(a, b) = (2 - 2 cos(p_a, z_b)) + (2 - 2 cos(p_b, z_a))``.

Un-Mix: ``L(x0, x1) + lam L(x1, mix) + (1 - lam) L(x1, flip(mix))``. ``mix_branches`` says which
branches see the mixture:

- ``both`` (default; the authors' harness): the mixture goes through the online *and* the target
  network, so ``L(x1, mix)`` has both directions: the mixture predicts the clean target and the
  clean view predicts the mixture's target.
- ``online``: the mixture only goes through the online network; ``L(x1, mix)`` keeps the one
  direction that exists, ``2 - 2 cos(p_mix, z_1)`` (the mixture predicts the clean target).

The target moves once per optimiser step, in ``after_step``, with the cosine schedule
``tau = 1 - (1 - tau_base) (cos(pi * progress) + 1) / 2`` (tau_base at the start, 1 at the end).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from pydantic import Field
from torch import nn

from unmix_ray.config import Model
from unmix_ray.losses.byol import normalized_mse
from unmix_ray.methods.base import SSLMethod, ema_update, frozen_copy
from unmix_ray.models import mlp


class BYOLParams(Model):
    proj_hidden: int = Field(1024, ge=1)
    proj_dim: int = Field(64, ge=1)
    pred_hidden: int = Field(1024, ge=1)
    tau_base: float = Field(0.99, ge=0.0, le=1.0)
    mix_branches: Literal["online", "both"] = "both"


class BYOLOutput(NamedTuple):
    p: torch.Tensor  # online prediction
    z: torch.Tensor | None  # target projection (no gradient); None when the target branch is skipped


def target_momentum(tau_base: float, progress: float) -> float:
    """BYOL's cosine schedule from ``tau_base`` (progress 0) to 1 (progress 1)."""
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class BYOL(SSLMethod):
    Params = BYOLParams

    def __init__(self, backbone: nn.Module, params: BYOLParams):
        super().__init__(backbone, params)
        self.projector = mlp([backbone.feature_dim, params.proj_hidden, params.proj_dim])
        self.predictor = mlp([params.proj_dim, params.pred_hidden, params.proj_dim])
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.backbone(x)))

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_backbone(x))

    def outputs(self, x: torch.Tensor) -> BYOLOutput:
        return BYOLOutput(self.online(x), self.target(x))

    def mix_outputs(self, x: torch.Tensor) -> BYOLOutput:
        return self.outputs(x) if self.params.mix_branches == "both" else BYOLOutput(self.online(x), None)

    def loss(self, a: BYOLOutput, b: BYOLOutput) -> torch.Tensor:
        # Each direction whose target exists: a predicts b's target, b predicts a's.
        terms = [normalized_mse(p, z) for p, z in ((a.p, b.z), (b.p, a.z)) if z is not None]
        return terms[0] if len(terms) == 1 else terms[0] + terms[1]

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        tau = target_momentum(self.params.tau_base, progress)
        ema_update(self.target_backbone, self.backbone, tau)
        ema_update(self.target_projector, self.projector, tau)
