"""Linear evaluation of a frozen encoder, two ways:

- ``fast`` (``linear_probe``): a linear layer on features extracted once (no augmentation), Adam,
  cosine (the SimCLR/BYOL harness protocol): cheap enough to run after every trial.
- ``paper`` (``linear_paper``): the per-dataset protocol of the paper (UNMIX.md, "Evaluation
  protocols"): frozen backbone with BN in eval mode, a linear layer trained by SGD on augmented
  views (RandomResizedCrop + flip), evaluated on the test split after every epoch; both the last
  and the best epoch are reported, as separate metrics.

Both train the classifier with ``_fit_batches`` and score it with ``_score``, on the device the
features are on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unmix_ray.augment import BatchAugment
from unmix_ray.config import AugmentConfig, EvalConfig
from unmix_ray.evaluation.features import extract_features, freeze
from unmix_ray.evaluation.knn import topk_accuracy
from unmix_ray.evaluation.protocols import PaperRecipe


def _fit_batches(clf: nn.Module, opt: torch.optim.Optimizer, feats: torch.Tensor, labels: torch.Tensor,
                 batch_size: int, order: torch.Tensor | None = None,
                 per_step: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """One optimiser step of ``clf`` per ``batch_size`` rows of ``feats``, taken in ``order`` (default:
    as they are)."""
    for b in range(0, feats.shape[0], batch_size):
        rows = slice(b, b + batch_size) if order is None else order[b:b + batch_size]
        loss = F.cross_entropy(clf(feats[rows]), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if per_step is not None:
            per_step.step()


@torch.no_grad()
def _score(clf: nn.Module, feats: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    scores = clf(feats)
    return topk_accuracy(scores, labels, 1), topk_accuracy(scores, labels, 5)


@dataclass(frozen=True)
class LinearResult:
    top1: float
    top5: float
    best_top1: float
    best_epoch: int


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, config: EvalConfig, seed: int = 0) -> LinearResult:
    """The ``fast`` protocol: a linear classifier on cached frozen features: Adam, lr cosine-decayed to
    1e-6, no augmentation (the SimCLR/BYOL harness protocol). Features are standardised with training
    statistics first, an affine map the linear layer could absorb, so the classifier is still linear
    in the features."""
    device = train_feats.device
    g = torch.Generator().manual_seed(seed)
    mu, sigma = train_feats.mean(0), train_feats.std(0).clamp_min(1e-6)
    xtr, xte = (train_feats - mu) / sigma, (test_feats - mu) / sigma
    ytr, yte = train_labels.to(device), test_labels.to(device)
    torch.manual_seed(seed)
    clf = torch.nn.Linear(xtr.shape[1], num_classes).to(device)
    opt = torch.optim.Adam(clf.parameters(), lr=config.linear_lr, weight_decay=config.linear_weight_decay)
    steps_per_epoch = max(1, -(-xtr.shape[0] // config.linear_batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.linear_epochs * steps_per_epoch, eta_min=1e-6)
    best, best_epoch, top1, top5 = 0.0, 0, 0.0, 0.0
    for epoch in range(config.linear_epochs):
        perm = torch.randperm(xtr.shape[0], generator=g).to(device)
        _fit_batches(clf, opt, xtr, ytr, config.linear_batch_size, order=perm, per_step=sched)
        top1, top5 = _score(clf, xte, yte)
        if top1 > best:
            best, best_epoch = top1, epoch + 1
    return LinearResult(top1, top5, best, best_epoch)


@dataclass(frozen=True)
class PaperResult:
    top1_last: float
    top5_last: float
    top1_best: float
    top5_best: float  # top-5 at the best top-1 epoch
    best_epoch: int
    history: list[tuple[float, float]] = field(default_factory=list)  # (top-1, top-5) after each epoch

    def metrics(self) -> dict[str, float]:
        return {"linear_paper_top1_last": self.top1_last, "linear_paper_top5_last": self.top5_last,
                "linear_paper_top1_best": self.top1_best, "linear_paper_top5_best": self.top5_best,
                "linear_paper_best_epoch": float(self.best_epoch)}

    @classmethod
    def of(cls, history: list[tuple[float, float]]) -> PaperResult:
        """The last epoch and the first epoch at the best top-1 of a (top-1, top-5) ``history``."""
        best = max(range(len(history)), key=lambda i: (history[i][0], -i))
        return cls(history[-1][0], history[-1][1], history[best][0], history[best][1], best + 1, list(history))


def paper_augment(recipe: PaperRecipe, crop: int, mean: tuple[float, ...], std: tuple[float, ...],
                  generator: torch.Generator) -> BatchAugment:
    """The ``paper`` protocol's training view: RandomResizedCrop (``recipe.crop_scale``) + flip, nothing else."""
    return BatchAugment(AugmentConfig(crop_scale=recipe.crop_scale, flip_p=0.5, jitter_p=0.0, gray_p=0.0,
                                      blur_p=0.0), crop, mean, std, generator)


def paper_classifier(feature_dim: int, num_classes: int, recipe: PaperRecipe, device: torch.device,
                     seed: int = 0) -> tuple[nn.Linear, torch.optim.SGD, torch.optim.lr_scheduler.LRScheduler]:
    """The ``paper`` protocol's linear layer (weights N(0, 0.01), bias 0, drawn from ``seed``), its SGD
    with momentum and its per-epoch schedule (cosine to 0, or x0.1 at each milestone)."""
    torch.manual_seed(seed)
    clf = nn.Linear(feature_dim, num_classes).to(device)
    nn.init.normal_(clf.weight, std=0.01)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    if recipe.schedule == "cosine":
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, recipe.epochs, eta_min=0.0)
    else:
        milestones = sorted({max(1, round(f * recipe.epochs)) for f in recipe.milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
    return clf, opt, sched


def linear_paper(encoder: nn.Module, feature_dim: int, train_images: torch.Tensor, train_labels: torch.Tensor,
                 test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...], crop: int, recipe: PaperRecipe,
                 device: torch.device, seed: int = 0, chunk: int = 1024) -> PaperResult:
    """The ``paper`` protocol: a linear layer on the frozen ``encoder`` (BN in eval mode), trained by SGD
    with momentum on a fresh RandomResizedCrop + flip view of every training image in every epoch,
    tested on the (non-augmented) test split after every epoch.

    The encoder is frozen and in eval mode, so each image's features do not depend on the rest of
    its batch: views are augmented and encoded ``chunk`` images at a time (batched on the device),
    then the classifier takes its SGD steps over them ``recipe.batch_size`` at a time, exactly as if
    each mini-batch had been encoded on its own. The test features never change and are extracted once.
    The encoder is left frozen (``freeze``).
    """
    freeze(encoder)
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    augment = paper_augment(recipe, crop, mean, std, gen)
    test_feats = extract_features(encoder, test_images, mean, std, crop, device, chunk,
                                  recipe.test_resize_px(crop))
    test_labels = test_labels.to(device)
    clf, opt, sched = paper_classifier(feature_dim, num_classes, recipe, device, seed)
    bs = recipe.batch_size
    chunk = max(bs, chunk // bs * bs)  # whole mini-batches per chunk
    labels = train_labels.to(device)
    history: list[tuple[float, float]] = []
    for _ in range(recipe.epochs):
        perm = torch.randperm(train_images.shape[0], generator=order)
        for c in range(0, perm.shape[0], chunk):
            idx = perm[c:c + chunk]
            with torch.no_grad():
                feats = encoder(augment(train_images[idx].to(device))).float()
            _fit_batches(clf, opt, feats, labels[idx.to(device)], bs)
        sched.step()
        history.append(_score(clf, test_feats, test_labels))
    return PaperResult.of(history)
