"""SimCLR (Chen et al., ICML 2020) with Un-Mix: NT-Xent between the clean view and the mixture."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from unmix_ray.losses.nt_xent import nt_xent
from unmix_ray.methods.base import SSLMethod
from unmix_ray.models import mlp


@dataclass(frozen=True)
class SimCLRParams:
    temperature: float = 0.5
    proj_hidden: int = 1024
    proj_dim: int = 64
    gather_negatives: bool = True  # negatives from every worker's batch (global-batch NT-Xent)


class SimCLR(SSLMethod):
    Params = SimCLRParams

    def __init__(self, backbone: nn.Module, params: SimCLRParams):
        super().__init__(backbone, params)
        self.projector = mlp([backbone.feature_dim, params.proj_hidden, params.proj_dim])

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def loss(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return nt_xent(a, b, self.params.temperature, gather=self.params.gather_negatives)
