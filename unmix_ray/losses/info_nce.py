"""InfoNCE with a queue of negatives, the loss of MoCo.

He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020
(MoCo v1); Chen et al., "Improved Baselines with Momentum Contrastive Learning", arXiv 2003.04297
(MoCo v2). Each query q_i is classified against its own key k_i (the positive) and the K keys of
the queue (the negatives): ``CE([q_i . k_i, q_i . queue] / T, 0)``, averaged over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE of queries ``q`` [n, d] against positives ``k`` [n, d] and negatives ``queue``
    [K, d]. Inputs are expected L2-normalised; ``k`` and ``queue`` are treated as constants. The
    logits are computed in float32 even under autocast: with T = 0.07 a bfloat16 dot product would
    move them by several hundredths."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.detach().float(), queue.detach().float()
        positive = (q * k).sum(dim=1, keepdim=True)
        logits = torch.cat([positive, q @ queue.T], dim=1) / temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
