"""Typed configs: a sweep YAML composed with configs/{datasets,methods}/ into one TrialConfig per trial.

A sweep file names datasets and methods; each name is read from ``configs/datasets/<name>.yaml`` or
``configs/methods/<name>.yaml`` and the sweep's per-name overrides are merged on top. Everything is
validated into frozen dataclasses here, before Ray is touched, and every problem is reported at once.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from unmix_ray.schema import ConfigError, build, to_dict

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

MixtureType = Literal["none", "mixup", "cutmix", "both"]


@dataclass(frozen=True)
class MixtureConfig:
    """Un-Mix mixture: ``type`` none|mixup|cutmix|both; ``prob`` = P, the chance a step uses mixup
    rather than CutMix when type is ``both``; lam ~ Beta(beta, beta)."""

    type: MixtureType = "none"
    prob: float = 0.5
    beta: float = 1.0

    def problems(self) -> list[str]:
        out = []
        if not 0.0 <= self.prob <= 1.0:
            out.append(f"prob: mixture probability P must be in [0, 1], got {self.prob}")
        if self.beta <= 0:
            out.append(f"beta: must be > 0, got {self.beta}")
        return out

    @property
    def variant(self) -> str:
        return f"both@{self.prob:g}" if self.type == "both" else self.type


@dataclass(frozen=True)
class AugmentConfig:
    """Two-view SSL augmentation recipe (applied batched, per-sample random parameters)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def problems(self) -> list[str]:
        out = []
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            out.append(f"crop_scale: need 0 < lo <= hi <= 1, got {self.crop_scale}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"{name}: a probability must be in [0, 1], got {getattr(self, name)}")
        return out


# Datasets torchvision can download (``download: true``); the others must be provided.
DOWNLOADABLE = ("cifar10", "cifar100", "stl10")


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset: where it lives, its shape and statistics, and its augmentation recipe.

    ``root`` is the local directory the loader reads. With ``source`` (``s3://bucket/prefix`` for a tree
    of objects, or ``s3://bucket/key.tar[.gz]|.tgz|.zip`` for one archive) each node stages the data into
    ``root`` once before loading (see ``unmix_ray.data.staging``); ``endpoint_url`` points boto3 at an
    S3-compatible store (credentials come from the environment or the instance role only).
    ``download: true`` lets torchvision fetch CIFAR / STL-10 into ``root`` when it is missing there.
    """

    name: str
    root: str
    num_classes: int
    channels: int
    image_size: int  # side of the stored images; for ImageNet, the side they are resized to (256)
    crop_size: int  # side of the views fed to the network
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrain_splits: tuple[str, ...] = ("train",)
    train_split: str = "train"
    test_split: str = "test"
    # Seeded random subsets, for the CPU demo and tests; null means the whole split.
    train_subset: int | None = None
    test_subset: int | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    source: str | None = None
    endpoint_url: str | None = None
    download: bool = False
    # Processes/threads decoding JPEGs (Tiny ImageNet, ImageNet); null: one per CPU, at most 8.
    decode_workers: int | None = None

    def problems(self) -> list[str]:
        out = []
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            out.append(f"mean/std: need {self.channels} values each (one per channel)")
        for name in ("train_subset", "test_subset"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                out.append(f"{name}: must be positive or null, got {v}")
        if self.crop_size <= 0 or self.image_size <= 0:
            out.append(f"image_size/crop_size: must be positive, got {self.image_size}/{self.crop_size}")
        if self.source is not None:
            bucket = self.source[5:].split("/", 1)[0] if self.source.startswith("s3://") else ""
            if len(bucket) < 3:
                out.append(f"source: expected s3://bucket/prefix or s3://bucket/archive.tar.gz, got "
                           f"{self.source!r}")
            if self.download:
                out.append("download: cannot be combined with source (the data comes from S3)")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            out.append("endpoint_url: expected http(s)://host[:port]")  # not echoed: it may embed secrets
        if self.download and self.name not in DOWNLOADABLE:
            out.append(f"download: torchvision cannot download {self.name!r} (only "
                       f"{', '.join(DOWNLOADABLE)})")
        if self.decode_workers is not None and self.decode_workers < 0:
            out.append(f"decode_workers: must be >= 0 or null, got {self.decode_workers}")
        return out


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser recipe. ``lr`` is stated for ``base_batch_size``; the lr used is
    ``lr * global_batch / base_batch_size`` (linear scaling), logged as ``lr_scaled``."""

    name: Literal["sgd", "adam", "lars"] = "sgd"
    lr: float = 0.06
    base_batch_size: int = 256
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    final_lr: float = 0.0

    def problems(self) -> list[str]:
        out = []
        if self.lr <= 0:
            out.append(f"lr: must be > 0, got {self.lr}")
        if self.base_batch_size <= 0:
            out.append(f"base_batch_size: must be > 0, got {self.base_batch_size}")
        if self.warmup_epochs < 0:
            out.append(f"warmup_epochs: must be >= 0, got {self.warmup_epochs}")
        return out


@dataclass(frozen=True)
class MethodConfig:
    """A base SSL method: ``params`` are validated against the method class's own ``Params``."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class TrainConfig:
    backbone: str = "resnet18_cifar"
    epochs: int = 10
    batch_size: int = 256  # global, split evenly over workers
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False  # torch.compile the method (GPU runs)
    checkpoint_every: int = 1  # epochs
    num_to_keep: int = 2
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the trial fails
    nan_check_every: int = 50  # steps between checks for a non-finite loss (each is one host sync)

    def problems(self) -> list[str]:
        out = []
        if self.epochs < 0:
            out.append(f"epochs: must be >= 0, got {self.epochs}")
        if self.num_workers < 1:
            out.append(f"num_workers: must be >= 1, got {self.num_workers}")
        elif self.batch_size % self.num_workers:
            out.append(f"batch_size: {self.batch_size} does not split evenly over {self.num_workers} workers")
        elif (self.batch_size // self.num_workers) % 2:
            out.append(
                f"batch_size: per-worker batch {self.batch_size // self.num_workers} is odd; Un-Mix pairs "
                "sample i with sample N-1-i, so an odd batch mixes its middle sample with itself"
            )
        if self.nan_check_every < 1:
            out.append(f"nan_check_every: must be >= 1, got {self.nan_check_every}")
        if self.checkpoint_every < 1:
            out.append(f"checkpoint_every: must be >= 1, got {self.checkpoint_every}")
        return out

    @property
    def batch_per_worker(self) -> int:
        return self.batch_size // self.num_workers


LinearProtocol = Literal["fast", "paper"]


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation of the frozen encoder: the weighted kNN monitor and final kNN, and the linear
    protocols the final evaluation runs (``linear_protocols``):

    - ``fast``: a linear layer on features extracted once (no augmentation), Adam with ``linear_*``;
    - ``paper``: the paper's per-dataset protocol with augmentation (``paper_*``; null takes the
      recipe's value: ``cifar`` = SGD lr 0.3, cosine, 100 epochs, batch 32; ``imagenet`` = SGD lr 30,
      x0.1 at 60% and 80% of 100 epochs, batch 256, resize 256 / centre 224 for test).
    """

    knn_k: int = 200
    knn_t: float = 0.1
    knn_every: int = 1  # epochs between kNN monitor evaluations (0: only at the end)
    linear_protocols: tuple[LinearProtocol, ...] = ("fast",)
    linear_epochs: int = 100
    linear_lr: float = 1e-2
    linear_batch_size: int = 512
    linear_weight_decay: float = 0.0
    paper_recipe: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: imagenet for ImageNet, else cifar
    paper_epochs: int | None = None
    paper_lr: float | None = None
    paper_batch_size: int | None = None
    paper_weight_decay: float | None = None
    paper_crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop's default scale
    feature_batch_size: int = 1024  # images per forward pass when extracting or augmenting features

    def problems(self) -> list[str]:
        out = []
        if self.knn_k < 1:
            out.append(f"knn_k: must be >= 1, got {self.knn_k}")
        if self.knn_t <= 0:
            out.append(f"knn_t: must be > 0, got {self.knn_t}")
        if len(set(self.linear_protocols)) != len(self.linear_protocols):
            out.append(f"linear_protocols: duplicate protocol in {list(self.linear_protocols)}")
        for name in ("linear_epochs", "linear_batch_size", "paper_epochs", "paper_batch_size", "feature_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                out.append(f"{name}: must be >= 1, got {v}")
        for name in ("linear_lr", "paper_lr"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                out.append(f"{name}: must be > 0, got {v}")
        for name in ("linear_weight_decay", "paper_weight_decay"):
            v = getattr(self, name)
            if v is not None and v < 0:
                out.append(f"{name}: must be >= 0, got {v}")
        lo, hi = self.paper_crop_scale
        if not 0 < lo <= hi <= 1:
            out.append(f"paper_crop_scale: need 0 < lo <= hi <= 1, got {self.paper_crop_scale}")
        return out


@dataclass(frozen=True)
class TrialConfig:
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

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialConfig:
        return build(cls, data, "trial")


@dataclass(frozen=True)
class GridConfig:
    dataset: list[str]
    method: list[str]
    mixture: list[MixtureType] = field(default_factory=lambda: ["none", "mixup", "cutmix", "both"])
    prob: list[float] = field(default_factory=lambda: [0.5])
    seed: list[int] = field(default_factory=lambda: [0])


@dataclass(frozen=True)
class AshaSettings:
    """ASHA early stopping (Li et al., 2020) on the per-epoch kNN monitor; a stopped trial is KILLED
    in MLflow and shows as stopped in the results table."""

    metric: str = "monitor_knn_top1"
    mode: Literal["max", "min"] = "max"
    grace_period: int = 1  # epochs every trial runs before it can be stopped
    reduction_factor: float = 2.0

    def problems(self) -> list[str]:
        out = []
        if self.grace_period < 1:
            out.append(f"grace_period: must be >= 1, got {self.grace_period}")
        if self.reduction_factor <= 1:
            out.append(f"reduction_factor: must be > 1, got {self.reduction_factor}")
        return out


@dataclass(frozen=True)
class TuneSettings:
    max_concurrent_trials: int | None = None  # null: derived from the cluster's resources
    storage_path: str | None = None  # local path or s3://bucket/prefix; null: ~/ray_results/unmix
    # S3-compatible endpoint for s3:// storage (null: AWS, or $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)
    storage_endpoint_url: str | None = None
    trial_cpus: float = 0.0  # resources held by each trial's driver (it only waits on Train)
    # Custom resources each trial's driver also holds, e.g. {trial_driver: 1} to keep drivers on the
    # cluster head that advertises them (cluster/aws-gpu.yaml). Both left at zero: one trial_driver
    # slot where the cluster offers one (the embedded local Ray does), else 0.01 CPU.
    trial_resources: dict[str, float] = field(default_factory=dict)
    asha: AshaSettings | None = None  # null: every trial runs to the end

    def problems(self) -> list[str]:
        out = []
        if self.trial_cpus < 0:
            out.append(f"trial_cpus: must be >= 0, got {self.trial_cpus}")
        for name, amount in self.trial_resources.items():
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
                out.append(f"trial_resources.{name}: must be a number >= 0, got {amount!r}")
        return out


@dataclass(frozen=True)
class SweepConfig:
    name: str
    grid: GridConfig
    experiment: str = "unmix-ray"
    mixture_beta: float = 1.0
    untrained_reference: bool = True
    train: dict[str, Any] = field(default_factory=dict)
    # Per-recipe changes to ``train``, keyed by a method name, a dataset name or "dataset/method";
    # merged in that order (the most specific wins). See ``trial_train``.
    train_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    tune: TuneSettings = field(default_factory=TuneSettings)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its settings and the fully resolved trials it will run."""

    config: SweepConfig
    trials: list[TrialConfig]

    @property
    def name(self) -> str:
        return self.config.name


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a nested dict."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([f"--set {item!r}: expected key.path=value"], "override")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError([f"--set {item!r}: {p} is not a mapping"], "override")
        node[leaf] = yaml.safe_load(raw)
    return out


def known_names(kind: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / kind).glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: top level must be a mapping"])
    return data


def trial_train(sweep: SweepConfig, dataset: str, method: str) -> dict[str, Any]:
    """The ``train`` mapping of one (dataset, method) cell: ``sweep.train`` with the
    ``train_overrides`` of the method, then of the dataset, then of "dataset/method" merged on top."""
    out = dict(sweep.train)
    for key in (method, dataset, f"{dataset}/{method}"):
        out = deep_merge(out, sweep.train_overrides.get(key, {}))
    return out


def load_sweep(path: str | Path, overrides: list[str] = (), config_dir: Path = CONFIG_DIR) -> Sweep:
    """Read, compose and validate a sweep; raise ConfigError naming every problem."""
    path = Path(path)
    if not path.is_file() and not path.is_absolute() and (config_dir.parent / path).is_file():
        path = config_dir.parent / path  # a path relative to the project, run from elsewhere
    if not path.is_file():
        raise ConfigError([f"{path}: no such sweep config (see {config_dir / 'sweeps'})"])
    return compose_sweep(apply_overrides(_read_yaml(path), list(overrides)), config_dir, source=str(path))


def compose_sweep(data: dict[str, Any], config_dir: Path = CONFIG_DIR, source: str = "sweep") -> Sweep:
    from unmix_ray.data import DATASETS
    from unmix_ray.methods import METHODS
    from unmix_ray.models import BACKBONES

    errors: list[str] = []
    sweep = build(SweepConfig, data, "sweep", errors)
    if sweep is None:
        raise ConfigError(errors, source)

    def component(kind: str, name: str, registry: dict, overrides: dict) -> dict | None:
        file = config_dir / kind / f"{name}.yaml"
        if name not in registry or not file.is_file():
            known = sorted(set(registry) & set(known_names(kind, config_dir)))
            errors.append(f"sweep.grid.{kind[:-1]}: unknown {kind[:-1]} {name!r} (known: {', '.join(known)})")
            return None
        return deep_merge(_read_yaml(file), overrides.get(name, {}))

    # Overrides may name datasets/methods outside the grid (so `--set grid.dataset=[...]` can cut a
    # sweep down), but every name must exist: a typo is an error, not a silently ignored block.
    known = {kind: set(registry) | set(known_names(kind, config_dir))
             for kind, registry in (("datasets", DATASETS), ("methods", METHODS))}
    for kind, names in (("datasets", sweep.datasets), ("methods", sweep.methods)):
        for extra in sorted(set(names) - known[kind]):
            errors.append(f"sweep.{kind}.{extra}: override for an unknown {kind[:-1]}")
    for key in sorted(sweep.train_overrides):
        dname, slash, mname = key.rpartition("/")
        if not (key in known["methods"] or key in known["datasets"]
                or (slash and dname in known["datasets"] and mname in known["methods"])):
            errors.append(f"sweep.train_overrides.{key}: not a known method, dataset or dataset/method")

    datasets = {n: component("datasets", n, DATASETS, sweep.datasets) for n in sweep.grid.dataset}
    methods = {n: component("methods", n, METHODS, sweep.methods) for n in sweep.grid.method}
    trains: dict[tuple[str, str], TrainConfig] = {}
    built: dict[str, TrainConfig] = {}  # each distinct merged train block is built (and reported) once
    for dname, mname in itertools.product(sweep.grid.dataset, sweep.grid.method):
        merged = trial_train(sweep, dname, mname)
        key = yaml.safe_dump(merged, sort_keys=True)
        if key not in built:
            where = "sweep.train" if merged == sweep.train else f"sweep.train+overrides({dname}/{mname})"
            built[key] = build(TrainConfig, merged, where, errors)
            if built[key] is not None and built[key].backbone not in BACKBONES:
                errors.append(f"{where}.backbone: unknown backbone {built[key].backbone!r} "
                              f"(known: {', '.join(BACKBONES)})")
        trains[dname, mname] = built[key]
    evaluation = build(EvalConfig, sweep.eval, "sweep.eval", errors)
    for i, p in enumerate(sweep.grid.prob):
        if not 0.0 <= p <= 1.0:
            errors.append(f"sweep.grid.prob[{i}]: mixture probability P must be in [0, 1], got {p}")
    if sweep.mixture_beta <= 0:
        errors.append(f"sweep.mixture_beta: must be > 0, got {sweep.mixture_beta}")

    typed_datasets = {
        n: build(DatasetConfig, d, f"datasets/{n}.yaml", errors) for n, d in datasets.items() if d is not None
    }
    typed_methods = {}
    for n, m in methods.items():
        if m is None:
            continue
        mc = build(MethodConfig, m, f"methods/{n}.yaml", errors)
        params = build(METHODS[n].Params, m.get("params") or {}, f"methods/{n}.yaml.params", errors)
        if mc is not None and params is not None:
            typed_methods[n] = replace(mc, params=to_dict(params))
    if errors:
        raise ConfigError(errors, source)

    trials = []
    for dname, mname, seed in itertools.product(sweep.grid.dataset, sweep.grid.method, sweep.grid.seed):
        train = trains[dname, mname]
        common = dict(sweep=sweep.name, seed=seed, dataset=typed_datasets[dname], method=typed_methods[mname],
                      train=train, eval=evaluation)
        if sweep.untrained_reference:
            trials.append(TrialConfig(mixture=MixtureConfig(beta=sweep.mixture_beta),
                                      **(common | {"train": replace(train, epochs=0)})))
        for mtype in sweep.grid.mixture:
            # P only matters when the type is "both"; other types run once.
            for p in sweep.grid.prob if mtype == "both" else sweep.grid.prob[:1]:
                trials.append(TrialConfig(mixture=MixtureConfig(mtype, p, sweep.mixture_beta), **common))
    names = [t.run_name for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError([f"sweep.grid: duplicate trials {dupes}"], source)
    return Sweep(sweep, trials)
