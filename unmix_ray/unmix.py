"""Un-Mix: image mixtures for self-supervised learning (Shen et al., AAAI 2022, arXiv 2003.05438).

Each step mixes the first view with the same batch in reverse order, ``mix = M(x0, flip(x0))``,
using one draw per step: ``lam ~ Beta(beta, beta)``; with probability P global mixing (mixup),
otherwise region mixing (CutMix, with ``lam`` corrected to the area of ``x0`` that remains).
Every method supplies its base loss ``L(a, b)``; the objective is written once here:

    loss = L(x0, x1) + lam * L(x1, mix) + (1 - lam) * L(x1, flip(mix))

``flip(mix)`` holds image i with weight ``1 - lam``; its embedding is ``flip(embed(mix))`` because the
encoder treats samples independently given batch statistics, so one extra forward pass suffices.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_map

from unmix_ray.config import MixtureConfig


@dataclass(frozen=True)
class Mixture:
    """One step's mixture: the mixed batch and ``lam``, the weight of image i in ``images[i]``."""

    images: torch.Tensor
    lam: float
    kind: str  # "mixup" or "cutmix"
    box: tuple[int, int, int, int] | None = None  # CutMix (y1, y2, x1, x2), pasted from the partner


def flip(tree: Any) -> Any:
    """Reverse the batch dimension of a tensor or of every tensor in a tuple/list/dict."""
    return tree_map(lambda t: t.flip(0) if isinstance(t, torch.Tensor) else t, tree)


def mixup(x: torch.Tensor, lam: float) -> torch.Tensor:
    return lam * x + (1.0 - lam) * x.flip(0)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Box with side ratio sqrt(1 - lam), centre uniform over pixels, corners clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y1, y2, x1, x2


def cutmix(x: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, float]:
    """Paste the partner's box into a copy of ``x``; return it and the corrected lam (area kept)."""
    y1, y2, x1, x2 = box
    out = x.clone()
    out[..., y1:y2, x1:x2] = x.flip(0)[..., y1:y2, x1:x2]
    height, width = x.shape[-2:]
    return out, 1.0 - (y2 - y1) * (x2 - x1) / (height * width)


class MixtureSampler:
    """Draws one mixture per step from its own seeded generator (host-side scalars only, so the
    batch stays on its device and no step waits on it). ``state``/``load_state`` for checkpoints."""

    def __init__(self, config: MixtureConfig, seed: int):
        self.config = config
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def enabled(self) -> bool:
        return self.config.type != "none"

    def __call__(self, x: torch.Tensor) -> Mixture | None:
        cfg = self.config
        if cfg.type == "none":
            return None
        lam = float(self.rng.beta(cfg.beta, cfg.beta))
        r = float(self.rng.random())
        use_mixup = cfg.type == "mixup" or (cfg.type == "both" and r < cfg.prob)
        if use_mixup:
            return Mixture(mixup(x, lam), lam, "mixup")
        box = cutmix_box(x.shape[-2], x.shape[-1], lam, self.rng)
        images, lam = cutmix(x, box)
        return Mixture(images, lam, "cutmix", box)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


@dataclass
class UnmixLoss:
    """The loss of one step, split into its clean and mixed parts (all scalar tensors)."""

    total: torch.Tensor
    clean: torch.Tensor
    mixed: torch.Tensor


def unmix_objective(
    base_loss: Callable[[Any, Any], torch.Tensor],
    out0: Any,
    out1: Any,
    out_mix: Any | None,
    lam: float,
) -> UnmixLoss:
    """``L(x0, x1) + lam L(x1, mix) + (1 - lam) L(x1, flip(mix))`` on the methods' outputs.

    ``out_mix`` is the method's output for the mixed batch (any tensor tree); its flip stands in for
    a forward pass of ``flip(mix)``. With ``out_mix`` None (no mixture) the loss is ``L(x0, x1)``.
    """
    clean = base_loss(out0, out1)
    if out_mix is None:
        return UnmixLoss(clean, clean, torch.zeros_like(clean))
    mixed = lam * base_loss(out1, out_mix) + (1.0 - lam) * base_loss(out1, flip(out_mix))
    return UnmixLoss(clean + mixed, clean, mixed)
