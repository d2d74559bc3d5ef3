"""Evaluation of a frozen encoder: weighted kNN and two linear protocols.

- ``fast``: a linear layer on features extracted once (no augmentation), Adam, cosine
  (the SimCLR/BYOL harness protocol): cheap enough to run after every trial.
- ``paper``: the per-dataset protocol of the paper (UNMIX.md, "Evaluation protocols"): frozen
  backbone with BN in eval mode, a linear layer trained by SGD on augmented views
  (RandomResizedCrop + flip), evaluated on the test split after every epoch; both the last and the
  best epoch are reported, as separate metrics.

Every number produced here carries a protocol string (``knn_protocol``, ``linear_protocol``,
``paper_protocol``), logged as the tag ``unmix.protocol.<key>`` next to it (``METRICS`` maps each
metric to its key), so a table never shows a number without saying how it was made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from unmix_ray.augment import BatchAugment, normalize
from unmix_ray.config import AugmentConfig, EvalConfig

PROTOCOL_TAG = "unmix.protocol."


@dataclass(frozen=True)
class MetricSpec:
    """A final-evaluation metric: its label, the key of its protocol tag (``unmix.protocol.<key>``) and,
    where a protocol yields several numbers, which one this metric is."""

    name: str
    label: str
    protocol: str
    reported: str = ""


_BEST = "the best epoch by test top-1, as the paper reported for CIFAR (chosen on the test set: optimistic)"
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("knn_top1", "kNN top-1", "knn"),
    MetricSpec("knn_top5", "kNN top-5", "knn"),
    MetricSpec("linear_top1", "linear (fast) top-1", "linear"),
    MetricSpec("linear_top5", "linear (fast) top-5", "linear"),
    MetricSpec("linear_paper_top1_last", "linear (paper) top-1, last epoch", "linear_paper", "the probe's last epoch"),
    MetricSpec("linear_paper_top5_last", "linear (paper) top-5, last epoch", "linear_paper", "the probe's last epoch"),
    MetricSpec("linear_paper_top1_best", "linear (paper) top-1, best epoch", "linear_paper", _BEST),
    MetricSpec("linear_paper_top5_best", "linear (paper) top-5 at the best top-1 epoch", "linear_paper", _BEST),
)
METRIC_SPECS = {m.name: m for m in METRICS}


def metric_protocol(metric: str, protocol_text: str | None) -> str:
    """The full protocol of one number: its protocol tag plus which of the protocol's numbers it is."""
    if not protocol_text:
        return ""
    spec = METRIC_SPECS.get(metric)
    return f"{protocol_text}; reported: {spec.reported}" if spec and spec.reported else protocol_text


def eval_view(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], size: int,
              resize: int | None = None) -> torch.Tensor:
    """The test transform: uint8 -> normalised float at ``size``; with ``resize``, the shorter side is
    resized to ``resize`` and the centre ``size`` x ``size`` is kept (ImageNet's 256 / 224)."""
    if resize is None:
        return normalize(images, mean, std, size)
    x = images.float().div_(255.0)
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     mean: tuple[float, ...], std: tuple[float, ...], size: int, device: torch.device,
                     batch_size: int = 1024, resize: int | None = None) -> torch.Tensor:
    """Features of uint8 ``images`` (no augmentation), on the CPU as float32 [N, D]."""
    out = [encoder(eval_view(images[i:i + batch_size].to(device), mean, std, size, resize)).float().cpu()
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
    hits = (scores.topk(k, dim=1).indices == labels.view(-1, 1).to(scores.device)).any(dim=1)
    return 100.0 * hits.float().mean().item()


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


@dataclass(frozen=True)
class PaperRecipe:
    """A linear-evaluation recipe of the paper. ``milestones`` are fractions of ``epochs`` (step
    schedule); ``test_resize`` is the shorter side before the centre crop, as a multiple of the crop."""

    name: str
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    schedule: str  # "cosine" (to 0, stepped per epoch) or "step" (x0.1 at each milestone)
    milestones: tuple[float, ...] = ()
    momentum: float = 0.9
    crop_scale: tuple[float, float] = (0.08, 1.0)
    test_resize: float | None = None

    def test_resize_px(self, crop: int) -> int | None:
        return round(crop * self.test_resize) if self.test_resize else None


# CIFAR: the SwAV linear-evaluation code the authors used (SGD lr 0.3, wd 1e-6, cosine to 0 over
# 100 epochs, batch 32). ImageNet: the MoCo linear classification protocol (SGD lr 30, wd 0,
# x0.1 at epochs 60 and 80 of 100, batch 256, resize 256 / centre 224 for test).
PAPER_RECIPES = {
    "cifar": PaperRecipe("cifar", 100, 0.3, 32, 1e-6, "cosine"),
    "imagenet": PaperRecipe("imagenet", 100, 30.0, 256, 0.0, "step", (0.6, 0.8), test_resize=256 / 224),
}


def paper_recipe(config: EvalConfig, dataset: str) -> PaperRecipe:
    """The recipe for ``dataset`` (``paper_recipe: auto`` picks ImageNet's for ImageNet, CIFAR's for the
    small-image datasets), with the ``paper_*`` settings that are not null applied on top."""
    name = config.paper_recipe if config.paper_recipe != "auto" else ("imagenet" if dataset == "imagenet" else "cifar")
    base = PAPER_RECIPES[name]
    return PaperRecipe(
        name, config.paper_epochs or base.epochs, config.paper_lr or base.lr,
        config.paper_batch_size or base.batch_size,
        base.weight_decay if config.paper_weight_decay is None else config.paper_weight_decay,
        base.schedule, base.milestones, base.momentum, tuple(config.paper_crop_scale), base.test_resize)


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


def _frozen(encoder: nn.Module) -> nn.Module:
    encoder.eval()  # BN uses its running statistics: the features do not depend on the batch
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


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
    """
    encoder = _frozen(encoder)
    gen = torch.Generator(device=device).manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    augment = BatchAugment(AugmentConfig(crop_scale=recipe.crop_scale, flip_p=0.5, jitter_p=0.0, gray_p=0.0,
                                         blur_p=0.0), crop, mean, std, gen)
    test_feats = extract_features(encoder, test_images, mean, std, crop, device, chunk,
                                  recipe.test_resize_px(crop)).to(device)
    test_labels = test_labels.to(device)
    torch.manual_seed(seed)
    clf = nn.Linear(feature_dim, num_classes).to(device)
    nn.init.normal_(clf.weight, std=0.01)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    if recipe.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs, eta_min=0.0)
    else:
        milestones = sorted({max(1, round(f * recipe.epochs)) for f in recipe.milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
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
            y = labels[idx.to(device)]
            for b in range(0, idx.shape[0], bs):
                loss = F.cross_entropy(clf(feats[b:b + bs]), y[b:b + bs])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        sched.step()
        with torch.no_grad():
            scores = clf(test_feats)
        history.append((topk_accuracy(scores, test_labels, 1), topk_accuracy(scores, test_labels, 5)))
    best = max(range(len(history)), key=lambda i: (history[i][0], -i))  # the first epoch at the best top-1
    return PaperResult(history[-1][0], history[-1][1], history[best][0], history[best][1], best + 1, history)


def knn_protocol(config: EvalConfig, bank: str, encoder_at: str = "last pretraining epoch") -> str:
    return (f"weighted kNN k={config.knn_k} t={config.knn_t} cosine on frozen backbone features, "
            f"bank={bank}, no augmentation, {encoder_at}")


def linear_protocol(config: EvalConfig, encoder_at: str = "last pretraining epoch") -> str:
    return (f"linear (fast): on cached frozen backbone features (BN eval, no augmentation), Adam lr {config.linear_lr} "
            f"cosine, {config.linear_epochs} epochs, batch {config.linear_batch_size}, last epoch of the probe, "
            f"{encoder_at}")


def paper_protocol(recipe: PaperRecipe, encoder_at: str = "last pretraining epoch") -> str:
    if recipe.schedule == "cosine":
        schedule = "cosine to 0"
    else:
        schedule = "x0.1 at epochs " + ", ".join(str(max(1, round(f * recipe.epochs))) for f in recipe.milestones)
    test = (f"resize {recipe.test_resize:.4g}x crop then centre crop" if recipe.test_resize
            else "no augmentation")
    return (f"linear (paper, {recipe.name} recipe): frozen backbone (BN eval), SGD lr {recipe.lr:g} momentum "
            f"{recipe.momentum:g} wd {recipe.weight_decay:g}, {schedule}, {recipe.epochs} epochs, batch "
            f"{recipe.batch_size}, train views RandomResizedCrop scale {tuple(recipe.crop_scale)} + flip, test "
            f"{test}; top-1 of the last epoch (*_last) and of the best epoch on the test split (*_best), "
            f"{encoder_at}")
