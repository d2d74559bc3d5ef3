"""The BYOL regression loss: normalised mean squared error, ``2 - 2 cos(p, z)``.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning", NeurIPS 2020.
The online network's prediction ``p`` regresses the target network's projection ``z`` of the other
view; ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``. The target is a constant (no gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``2 - 2 cos(p_i, z_i)``; ``z`` is detached."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)).mean()
