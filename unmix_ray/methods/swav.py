"""SwAV (Caron et al., NeurIPS 2020) with Un-Mix.

Each view's L2-normalised projection is scored against K prototypes (unit vectors); Sinkhorn-Knopp
turns the scores of the global batch into codes (``losses.swav.sinkhorn``), and each view's scores
predict the other view's codes (swapped prediction). A view's output is the pair (scores, codes).

Un-Mix: ``L(x0, x1) + lam L(x1, mix) + (1 - lam) L(x1, flip(mix))``. The mixed batch gets its own
codes from its own Sinkhorn pass; for the reversed term ``flip`` reverses *both* its scores and its
codes, which is exactly what a forward pass of ``flip(mix)`` would give (Sinkhorn treats the samples
of a batch symmetrically). The prototypes are put back on the unit sphere at construction and after
every optimiser step (``after_step``), as SwAV does before each forward.

The prototypes are frozen for the first ``freeze_prototypes_iters`` optimiser steps, as SwAV's
``freeze_prototypes_niters`` does (5005 in the authors' CIFAR script): their gradient is dropped before
each of those steps (``frozen_parameters``, honoured by ``unmix_ray.optim.build_optimizer``), so neither
the gradient nor weight decay nor momentum moves them. The count of optimiser steps taken is part of
the method's state (``state_dict``), so a run resumed from a checkpoint keeps counting.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from unmix_ray.config import Model
from unmix_ray.losses.swav import sinkhorn, swapped_prediction
from unmix_ray.methods.base import SSLMethod
from unmix_ray.models import mlp


class SwAVParams(Model):
    proj_hidden: int = Field(512, ge=1)
    proj_dim: int = Field(128, ge=1)
    n_prototypes: int = Field(100, ge=2)
    temperature: float = Field(0.1, gt=0.0)
    sinkhorn_eps: float = Field(0.05, gt=0.0)
    sinkhorn_iters: int = Field(3, ge=1)
    freeze_prototypes_iters: int = Field(0, ge=0)  # optimiser steps with the prototypes frozen (0: none)


class SwAVOutput(NamedTuple):
    scores: torch.Tensor  # projection . prototypes, [n, K]
    codes: torch.Tensor  # Sinkhorn assignment of the scores, [n, K], no gradient


class SwAV(SSLMethod):
    Params = SwAVParams

    def __init__(self, backbone: nn.Module, params: SwAVParams):
        super().__init__(backbone, params)
        self.projector = mlp([backbone.feature_dim, params.proj_hidden, params.proj_dim])
        self.prototypes = nn.Linear(params.proj_dim, params.n_prototypes, bias=False)
        self.normalize_prototypes()
        self.optimizer_steps = 0  # a host-side count, so that deciding to freeze needs no device sync

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def outputs(self, x: torch.Tensor) -> SwAVOutput:
        z = self.projector(self.backbone(x))
        # Scores in float32 even under autocast: Sinkhorn takes exp(scores / 0.05), which would
        # turn bfloat16 rounding of the scores into errors of several percent in the codes.
        with torch.autocast(x.device.type, enabled=False):
            scores = self.prototypes(F.normalize(z.float(), dim=1))
        codes = sinkhorn(scores.detach(), self.params.sinkhorn_eps, self.params.sinkhorn_iters)
        return SwAVOutput(scores, codes)

    def loss(self, a: SwAVOutput, b: SwAVOutput) -> torch.Tensor:
        return swapped_prediction(a.scores, a.codes, b.scores, b.codes, self.params.temperature)

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradient is dropped before the coming optimiser step."""
        return [self.prototypes.weight] if self.optimizer_steps < self.params.freeze_prototypes_iters else []

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        frozen = bool(self.frozen_parameters())  # then the step left the prototypes as they were: unit
        self.optimizer_steps += 1
        if not frozen:
            self.normalize_prototypes()

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.optimizer_steps, dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.optimizer_steps = int(state)
