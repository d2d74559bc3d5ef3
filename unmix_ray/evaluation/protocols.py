"""How every evaluation number is made, in words: the protocol string logged beside each metric.

Every number the project produces carries a protocol string (``knn_protocol``, ``linear_protocol``,
``paper_protocol``), logged as the tag ``unmix.protocol.<key>`` next to it (``METRICS`` maps each
metric to its key), so a table never shows a number without saying how it was made. The paper's
linear-evaluation recipes (``PAPER_RECIPES``) live here too, since their strings describe them.
"""

from __future__ import annotations

from dataclasses import dataclass

from unmix_ray.config import EvalConfig

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


def knn_protocol(config: EvalConfig, bank: str, encoder_at: str = "last pretraining epoch",
                 representation: str = "frozen backbone features") -> str:
    """``representation``: what the neighbours are found on (``SSLMethod.knn_representation``)."""
    return (f"weighted kNN k={config.knn_k} t={config.knn_t} cosine on {representation}, "
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
