"""The typed config of one trial: dataset, method, mixture, training and evaluation blocks.

Each block validates its own fields (constraints, unknown keys, non-finite numbers) and the relations
between them; ``configs/`` holds the YAML they are read from (``unmix_ray.compose`` composes a sweep).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from unmix_ray.config.base import Model, build, invalid

MixtureType = Literal["none", "mixup", "cutmix", "both"]


def _scale_range(value: tuple[float, float]) -> tuple[float, float]:
    lo, hi = value
    if not 0 < lo <= hi <= 1:
        raise invalid(f"need 0 < lo <= hi <= 1, got {tuple(value)}")
    return value


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]
ScaleRange = Annotated[tuple[float, float], AfterValidator(_scale_range)]  # a fraction of the image area


class MixtureConfig(Model):
    """Un-Mix mixture: ``type`` none|mixup|cutmix|both; ``prob`` = P, the chance a step uses mixup
    rather than CutMix when type is ``both``; lam ~ Beta(beta, beta)."""

    type: MixtureType = "none"
    prob: float = 0.5
    beta: Positive = 1.0

    @field_validator("prob")
    @classmethod
    def _prob(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise invalid(f"mixture probability P must be in [0, 1], got {v}")
        return v

    @property
    def variant(self) -> str:
        return f"both@{self.prob:g}" if self.type == "both" else self.type


class AugmentConfig(Model):
    """Two-view SSL augmentation recipe (applied batched, per-sample random parameters)."""

    crop_scale: ScaleRange = (0.2, 1.0)
    crop_ratio: tuple[Positive, Positive] = (3 / 4, 4 / 3)
    flip_p: Probability = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: Probability = 0.8
    gray_p: Probability = 0.2
    blur_p: Probability = 0.0
    blur_sigma: tuple[Positive, Positive] = (0.1, 2.0)


def loader_contract(module_name: str) -> tuple[ModuleType | None, str]:
    """(the module, "") when ``module_name`` imports and has a loader's ``LAYOUT`` and ``load`` (the
    contract of ``unmix_ray.data``), else (module or None, the problem). Modules are imported by name, so
    a dataset outside this package registers itself through its YAML alone."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return None, f"cannot import the loader module {module_name!r} ({type(e).__name__}: {e})"
    missing = [a for a in ("LAYOUT", "load") if not hasattr(module, a)]
    if missing:
        return module, f"{module_name} has no {' and no '.join(missing)} (the loader contract: see unmix_ray.data)"
    return module, ""


class DatasetConfig(Model):
    """One dataset: where it lives, its shape and statistics, and its augmentation recipe.

    ``loader`` names the module that reads it (``unmix_ray.data.<name>`` when null; any importable
    module, inside this package or not, see ``unmix_ray.data``), ``loader_options`` are passed to it.
    ``root`` is the local directory the loader reads. With ``source`` (``s3://bucket/prefix`` for a tree
    of objects, or ``s3://bucket/key.tar[.gz]|.tgz|.zip`` for one archive) each node stages the data into
    ``root`` once before loading (see ``unmix_ray.data.staging``); ``endpoint_url`` points boto3 at an
    S3-compatible store (credentials come from the environment or the instance role only).
    ``download: true`` lets the loader fetch the data into ``root`` when it is missing there.
    """

    name: str
    root: str
    loader: str | None = None
    loader_options: dict[str, Any] = Field(default_factory=dict)
    num_classes: int = Field(ge=2)
    channels: int = Field(ge=1)
    image_size: int = Field(gt=0)  # side of the stored images; for ImageNet, the side they are resized to
    crop_size: int = Field(gt=0)  # side of the views fed to the network
    mean: tuple[float, ...]
    std: tuple[Positive, ...]
    pretrain_splits: tuple[str, ...] = Field(("train",), min_length=1)
    train_split: str = "train"
    test_split: str = "test"
    # Seeded random subsets, for the CPU demo and tests; null means the whole split.
    train_subset: int | None = Field(None, gt=0)
    test_subset: int | None = Field(None, gt=0)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    source: str | None = None
    endpoint_url: str | None = None
    download: bool = False
    # Processes/threads decoding JPEGs (Tiny ImageNet, ImageNet); null: one per CPU, at most 8.
    decode_workers: int | None = Field(None, ge=0)

    @field_validator("crop_size")
    @classmethod
    def _crop_fits(cls, v: int, info: ValidationInfo) -> int:
        image = info.data.get("image_size")
        if image is not None and v > image:
            raise invalid(f"crop {v} px is larger than the stored images ({image} px, image_size)")
        return v

    @field_validator("mean", "std")
    @classmethod
    def _per_channel(cls, v: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        channels = info.data.get("channels")
        if channels is not None and len(v) != channels:
            raise invalid(f"need {channels} values (one per channel), got {len(v)}")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str | None) -> str | None:
        if v is not None:
            bucket = v[5:].split("/", 1)[0] if v.startswith("s3://") else ""
            if len(bucket) < 3:
                raise invalid(f"expected s3://bucket/prefix or s3://bucket/archive.tar.gz, got {v!r}")
        return v

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise invalid("expected http(s)://host[:port]")  # not echoed: it may embed secrets
        return v

    @classmethod
    def raw_problems(cls, data: dict[str, Any]) -> list[tuple[str, str]]:
        name, loader = data.get("name"), data.get("loader")
        if not isinstance(name, str) or not (loader is None or isinstance(loader, str)):
            return []  # reported as type errors
        loader = loader or f"unmix_ray.data.{name}"
        module, problem = loader_contract(loader)
        out = [("loader", problem)] if problem else []
        if data.get("download") is True:
            if data.get("source"):
                out.append(("download", "cannot be combined with source (the data comes from S3)"))
            if module is not None and not hasattr(module, "download"):
                out.append(("download", f"torchvision cannot download {name!r} (its loader {loader} has no "
                                        "download())"))
        return out

    @property
    def loader_module(self) -> str:
        return self.loader or f"unmix_ray.data.{self.name}"


class OptimConfig(Model):
    """Optimiser recipe. ``lr`` is stated for ``base_batch_size``; the lr used is
    ``lr * global_batch / base_batch_size`` (linear scaling), logged as ``lr_scaled``.

    Schedule (``unmix_ray.optim.lr_factor``): a linear warm-up over ``warmup_epochs`` or
    ``warmup_iters`` optimiser steps (0: none; both non-zero is an error), then ``cosine`` down to
    ``final_lr``, ``constant``, or ``step``: the lr times ``gamma`` once per milestone passed, with
    ``milestones`` in epochs (the lr of epoch ``e`` is ``lr * gamma ** #{m <= e}``, as MoCo's
    ``--schedule`` and torch's ``MultiStepLR`` count them).

    Weight decay applies to every parameter, as ``torch.optim`` does and as the MoCo, SwAV and
    SimCLR/BYOL harness recipes train; ``wd_exclude_norm_bias: true`` exempts biases and normalisation
    parameters (every 1-d tensor), as SimCLR's and BYOL's ImageNet LARS recipes do.
    """

    name: Literal["sgd", "adam", "lars"] = "sgd"
    lr: Positive = 0.06
    base_batch_size: int = Field(256, gt=0)
    weight_decay: float = Field(5e-4, ge=0.0)
    wd_exclude_norm_bias: bool = False
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_epochs: float = Field(0.0, ge=0.0)
    warmup_iters: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    final_lr: float = Field(0.0, ge=0.0)
    milestones: tuple[Annotated[int, Field(ge=1)], ...] = ()
    gamma: float = Field(0.1, gt=0.0, le=1.0)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(b <= a for a, b in zip(v, v[1:])):
            raise invalid(f"milestones must increase strictly, got {list(v)}")
        return v

    @classmethod
    def raw_problems(cls, data: dict[str, Any]) -> list[tuple[str, str]]:
        def positive(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0

        out = []
        iters, epochs = data.get("warmup_iters"), data.get("warmup_epochs")
        if positive(iters) and positive(epochs):
            out.append(("warmup_iters", f"warm-up given twice ({iters} iterations and {epochs} epochs): "
                                        "set one of warmup_iters and warmup_epochs to 0"))
        schedule, milestones = data.get("schedule", "cosine"), data.get("milestones")
        if schedule == "step" and not milestones:
            out.append(("milestones", "schedule 'step' needs milestones (epochs at which the lr is "
                                      "multiplied by gamma)"))
        if milestones and schedule != "step" and isinstance(schedule, str):
            out.append(("milestones", f"only apply to schedule 'step', not {schedule!r}"))
        return out


class MethodConfig(Model):
    """A base SSL method: ``params`` are validated against the method class's own ``Params``."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    optim: OptimConfig = Field(default_factory=OptimConfig)


class TrainConfig(Model):
    """How a trial trains. ``sync_bn``: BatchNorm over the global batch of all workers (SyncBatchNorm on
    GPUs) or over each worker's own batch; ``auto`` follows the method's reference: global for SimCLR,
    BYOL and SwAV, per worker for MoCo (its keys use shuffle-BN). One worker's BN is always global."""

    backbone: str = "resnet18_cifar"
    epochs: int = Field(10, ge=0)
    num_workers: int = Field(1, ge=1)
    batch_size: int = Field(256, ge=2)  # global, split evenly over workers
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0.0)
    torch_threads: int | None = Field(None, ge=1)
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False  # torch.compile the method (GPU runs)
    checkpoint_every: int = Field(1, ge=1)  # epochs
    num_to_keep: int = Field(2, ge=1)
    # Worker-group restarts from the last checkpoint before the trial fails (-1: no limit, for spot nodes);
    # every trial checkpoints, so a lost worker costs at most checkpoint_every epochs.
    max_failures: int = Field(2, ge=-1)
    nan_check_every: int = Field(50, ge=1)  # steps between checks for a non-finite loss (each is one host sync)
    sync_bn: bool | Literal["auto"] = "auto"

    @field_validator("batch_size")
    @classmethod
    def _splits_evenly(cls, v: int, info: ValidationInfo) -> int:
        workers = info.data.get("num_workers")
        if workers is None:
            return v
        if v % workers:
            raise invalid(f"{v} does not split evenly over {workers} workers")
        if (v // workers) % 2:
            raise invalid(f"per-worker batch {v // workers} is odd; Un-Mix pairs sample i with sample N-1-i, "
                          "so an odd batch mixes its middle sample with itself")
        return v

    @property
    def batch_per_worker(self) -> int:
        return self.batch_size // self.num_workers


LinearProtocol = Literal["fast", "paper"]


class EvalConfig(Model):
    """Evaluation of the frozen encoder: the weighted kNN monitor and final kNN, and the linear
    protocols the final evaluation runs (``linear_protocols``):

    - ``fast``: a linear layer on features extracted once (no augmentation), Adam with ``linear_*``;
    - ``paper``: the paper's per-dataset protocol with augmentation (``paper_*``; null takes the
      recipe's value: ``cifar`` = SGD lr 0.3, cosine, 100 epochs, batch 32; ``imagenet`` = SGD lr 30,
      x0.1 at 60% and 80% of 100 epochs, batch 256, resize 256 / centre 224 for test).
    """

    knn_k: int = Field(200, ge=1)
    knn_t: Positive = 0.1
    knn_every: int = Field(1, ge=0)  # epochs between kNN monitor evaluations (0: only at the end)
    linear_protocols: tuple[LinearProtocol, ...] = ("fast",)
    linear_epochs: int = Field(100, ge=1)
    linear_lr: Positive = 1e-2
    linear_batch_size: int = Field(512, ge=1)
    linear_weight_decay: float = Field(0.0, ge=0.0)
    paper_recipe: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: imagenet for ImageNet, else cifar
    paper_epochs: int | None = Field(None, ge=1)
    paper_lr: float | None = Field(None, gt=0.0)
    paper_batch_size: int | None = Field(None, ge=1)
    paper_weight_decay: float | None = Field(None, ge=0.0)
    paper_crop_scale: ScaleRange = (0.08, 1.0)  # RandomResizedCrop's default scale
    feature_batch_size: int = Field(1024, ge=1)  # images per forward pass when extracting or augmenting features

    @field_validator("linear_protocols")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(v)) != len(v):
            raise invalid(f"duplicate protocol in {list(v)}")
        return v


class TrialConfig(Model):
    """Everything one trial (one pretraining + its evaluation) needs; a plain dict crosses Ray."""

    sweep: str
    seed: int
    dataset: DatasetConfig
    method: MethodConfig
    mixture: MixtureConfig
    train: TrainConfig
    eval: EvalConfig

    @property
    def variant(self) -> str:
        return "untrained" if self.train.epochs == 0 else self.mixture.variant

    @property
    def run_name(self) -> str:
        head = f"{self.method.name}-{self.dataset.name}"
        if self.train.epochs == 0:
            return f"{head}-{self.train.backbone}-untrained-s{self.seed}"
        return f"{head}-{self.mixture.type}-p{self.mixture.prob}-s{self.seed}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        return build(cls, data, "trial")
