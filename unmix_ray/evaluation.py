"""Evaluation of a frozen encoder: weighted kNN and a linear probe on cached features.

Every number produced here carries a protocol string (see ``knn_protocol`` / ``linear_protocol``),
logged next to it, so a table never shows a number without saying how it was made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unmix_ray.augment import normalize
from unmix_ray.config import EvalConfig


@torch.no_grad()
def extract_features(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     mean: tuple[float, ...], std: tuple[float, ...], size: int, device: torch.device,
                     batch_size: int = 1024) -> torch.Tensor:
    """Features of uint8 ``images`` (no augmentation), on the CPU as float32 [N, D]."""
    out = [encoder(normalize(images[i:i + batch_size].to(device), mean, std, size)).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                num_classes: int, k: int = 200, t: float = 0.1, chunk: int = 1024) -> torch.Tensor:
    """Weighted kNN (Wu et al., 2018; the MoCo/InstDisc monitor): cosine similarity, the k nearest
    training samples vote for their class with weight exp(sim / t). Returns class scores [M, C]."""
    train = F.normalize(train_feats, dim=1)
    k = min(k, train.shape[0])
    scores = []
    for i in range(0, test_feats.shape[0], chunk):
        sim = F.normalize(test_feats[i:i + chunk], dim=1) @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / t).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels.view(-1, 1)).any(dim=1)
    return 100.0 * hits.float().mean().item()


@dataclass(frozen=True)
class LinearResult:
    top1: float
    top5: float
    best_top1: float
    best_epoch: int


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, config: EvalConfig, seed: int = 0) -> LinearResult:
    """A linear classifier on cached frozen features: Adam, lr cosine-decayed to 1e-6, no augmentation
    (the SimCLR/BYOL harness protocol). Features are standardised with training statistics first, an
    affine map the linear layer could absorb, so the classifier is still linear in the features."""
    g = torch.Generator().manual_seed(seed)
    mu, sigma = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    xtr, xte = (train_feats - mu) / sigma, (test_feats - mu) / sigma
    torch.manual_seed(seed)
    clf = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.Adam(clf.parameters(), lr=config.linear_lr, weight_decay=config.linear_weight_decay)
    steps_per_epoch = max(1, -(-xtr.shape[0] // config.linear_batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.linear_epochs * steps_per_epoch, eta_min=1e-6)
    best, best_epoch, top1, top5 = 0.0, 0, 0.0, 0.0
    for epoch in range(config.linear_epochs):
        perm = torch.randperm(xtr.shape[0], generator=g)
        for i in range(0, xtr.shape[0], config.linear_batch_size):
            idx = perm[i:i + config.linear_batch_size]
            loss = F.cross_entropy(clf(xtr[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            scores = clf(xte)
        top1, top5 = topk_accuracy(scores, test_labels, 1), topk_accuracy(scores, test_labels, 5)
        if top1 > best:
            best, best_epoch = top1, epoch + 1
    return LinearResult(top1, top5, best, best_epoch)


def knn_protocol(config: EvalConfig, bank: str) -> str:
    return (f"weighted kNN k={config.knn_k} t={config.knn_t} cosine on frozen backbone features, "
            f"bank={bank}, no augmentation, last pretraining epoch")


def linear_protocol(config: EvalConfig) -> str:
    return (f"linear on cached frozen backbone features (BN eval, no augmentation), Adam lr {config.linear_lr} "
            f"cosine, {config.linear_epochs} epochs, last epoch of the probe, last pretraining epoch")
