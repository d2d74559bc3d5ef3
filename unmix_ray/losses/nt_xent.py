"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020.
For a batch of pairs (a_i, b_i), each of the 2N embeddings takes its partner as the positive and the
other 2N - 2 embeddings as negatives. Across workers, the negatives are gathered from every rank
*with* gradients, so the loss (and its gradient, after DDP's averaging) equals the single-process
loss on the concatenated global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmix_ray.collectives import gather_with_grad


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """Mean NT-Xent over the 2n local anchors of ``a`` [n, d] and ``b`` [n, d], paired by row. The
    similarities are computed in float32 even under autocast (which would otherwise run the matmul in
    bfloat16, whose 8-bit mantissa moves cosine logits by up to about 0.01 / temperature)."""
    with torch.autocast(a.device.type, enabled=False):
        a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
        (a_all, offset), (b_all, _) = (gather_with_grad(a), gather_with_grad(b)) if gather else ((a, 0), (b, 0))
        n, n_all = a.shape[0], a_all.shape[0]
        anchors = torch.cat([a, b])
        logits = anchors @ torch.cat([a_all, b_all]).T / temperature
        idx = torch.arange(n, device=a.device) + offset
        self_idx = torch.cat([idx, idx + n_all])
        positive = torch.cat([idx + n_all, idx])
        logits = logits.masked_fill(F.one_hot(self_idx, 2 * n_all).bool(), float("-inf"))
        return F.cross_entropy(logits, positive)
