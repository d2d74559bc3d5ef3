"""The weighted kNN classifier on frozen features (Wu et al., 2018; the MoCo/InstDisc monitor) and
top-k accuracy. Both run where their tensors are (the training device), in chunks of queries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bytes one chunk's [queries, bank] similarity matrix may take. 1 GiB holds ~210 queries against
# ImageNet's 1.28 M-image train split in float32: a few percent of any training GPU's memory, and
# matrices large enough that the matmul and top-k run at full speed.
SIMILARITY_BUDGET_BYTES = 1 << 30


def query_chunk(bank_size: int, dtype: torch.dtype, budget_bytes: int = SIMILARITY_BUDGET_BYTES) -> int:
    """Queries per chunk such that a chunk's similarity matrix (``chunk x bank_size`` of ``dtype``)
    fits in ``budget_bytes``; at least one."""
    row_bytes = max(1, bank_size) * torch.empty((), dtype=dtype).element_size()
    return max(1, budget_bytes // row_bytes)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 200, t: float = 0.1, chunk: int | None = None,
                budget_bytes: int = SIMILARITY_BUDGET_BYTES) -> torch.Tensor:
    """Weighted kNN: cosine similarity, the k nearest training samples vote for their class with
    weight exp(sim / t). Returns class scores [M, C] on the bank's device.

    Queries go ``chunk`` at a time (default: as many as keep one chunk's similarity matrix within
    ``budget_bytes``, see ``query_chunk``). Nothing is read back to the host: the votes of each
    chunk are written into the score matrix on the device."""
    train = F.normalize(train_feats, dim=1)
    labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    chunk = chunk or query_chunk(train.shape[0], train.dtype, budget_bytes)
    scores = torch.zeros(test_feats.shape[0], num_classes, dtype=train.dtype, device=train.device)
    for i in range(0, test_feats.shape[0], chunk):
        sim = F.normalize(test_feats[i:i + chunk].to(train.device), dim=1) @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        del sim  # free the chunk's matrix before the next one is allocated
        scores[i:i + chunk].scatter_add_(1, labels[top_idx], top_sim.div_(t).exp_())
    return scores


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels.view(-1, 1).to(scores.device)).any(dim=1)
    return 100.0 * hits.float().mean().item()
