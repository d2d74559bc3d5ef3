"""Method registry: one file per base SSL method, each a subclass of ``SSLMethod``."""

from __future__ import annotations

from torch import nn

from unmix_ray.config import MethodConfig, build
from unmix_ray.methods.base import SSLMethod
from unmix_ray.methods.byol import BYOL
from unmix_ray.methods.moco import MoCoV1, MoCoV2
from unmix_ray.methods.simclr import SimCLR
from unmix_ray.methods.swav import SwAV

METHODS: dict[str, type[SSLMethod]] = {
    "simclr": SimCLR,
    "byol": BYOL,
    "moco_v1": MoCoV1,
    "moco_v2": MoCoV2,
    "swav": SwAV,
}


def build_method(config: MethodConfig, backbone: nn.Module) -> SSLMethod:
    cls = METHODS[config.name]
    return cls(backbone, build(cls.Params, config.params, f"methods/{config.name}.params"))
