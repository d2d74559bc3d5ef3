"""SimCLR (Chen et al., ICML 2020) with Un-Mix: NT-Xent between the clean view and the mixture."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from unmix_ray.config import Model
from unmix_ray.losses.nt_xent import nt_xent
from unmix_ray.methods.base import SSLMethod
from unmix_ray.models import mlp


class SimCLRParams(Model):
    temperature: float = Field(0.5, gt=0.0)
    proj_hidden: int = Field(1024, ge=1)
    proj_dim: int = Field(64, ge=1)
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
