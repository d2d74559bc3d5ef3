"""The weighted kNN classifier on frozen features (Wu et al., 2018; the MoCo/InstDisc monitor) and
top-k accuracy. Both run where their tensors are (the training device), in chunks of queries."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN: cosine similarity, the k nearest training samples vote for their class with
    weight exp(sim / t). Returns class scores [M, C]."""
    train = F.normalize(train_feats, dim=1)
    k = min(k, train.shape[0])
    scores = []
    for i in range(0, test_feats.shape[0], chunk):
        sim = F.normalize(test_feats[i:i + chunk], dim=1) @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / t).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels.to(weights.device)[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels.view(-1, 1).to(scores.device)).any(dim=1)
    return 100.0 * hits.float().mean().item()
