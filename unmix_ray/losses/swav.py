"""SwAV: online codes by Sinkhorn-Knopp and the swapped-prediction loss.

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments",
NeurIPS 2020. Each sample's projection is scored against K prototypes. Codes are the soft
assignment Q (B x K) that solves an entropy-regularised transport problem with equal partition:
every sample carries mass 1 and every prototype receives B / K of the global batch. Sinkhorn-Knopp
alternates row (prototype) and column (sample) normalisations of ``exp(scores / eps)``; the
prototype sums run over the *global* batch, summed across workers. The loss predicts one view's
code from the other view's scores: ``-sum_k q_b log softmax(s_a / T)_k`` and the swap, averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unmix_ray.collectives import all_reduce_sum, world_size


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """Codes [B_local, K] for ``scores`` [B_local, K], with the equal-partition constraint over the
    global batch. Each row of the result sums to 1; each prototype's column sums (over all ranks) to
    B / K, approached as ``iters`` grows."""
    q = torch.exp(scores.float() / eps).T  # K x B_local
    n_protos = q.shape[0]
    n_samples = q.shape[1] * world_size()
    q /= all_reduce_sum(q.sum())
    for _ in range(iters):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))  # each prototype: total mass 1 ...
        q /= n_protos  # ... then 1 / K
        q /= q.sum(dim=0, keepdim=True)  # each sample: total mass 1 ...
        q /= n_samples  # ... then 1 / B
    return (q * n_samples).T  # each sample's code sums to 1


def swapped_prediction(
    scores_a: torch.Tensor, codes_a: torch.Tensor, scores_b: torch.Tensor, codes_b: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Mean of the two swapped cross-entropies: a's scores predict b's codes and b's predict a's."""
    def ce(scores: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return -(codes.detach() * F.log_softmax(scores.float() / temperature, dim=1)).sum(dim=1).mean()

    return 0.5 * (ce(scores_a, codes_b) + ce(scores_b, codes_a))
