"""The typed config of a sweep: its grid, the per-recipe overrides, and how Ray Tune runs it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from unmix_ray.config.base import Model, invalid
from unmix_ray.config.models import MixtureType, TrialConfig


def _probability(p: float) -> float:  # the message says what P is; the schema states the bounds
    if not 0.0 <= p <= 1.0:
        raise invalid(f"mixture probability P must be in [0, 1], got {p}")
    return p


P = Annotated[float, AfterValidator(_probability), Field(json_schema_extra={"minimum": 0, "maximum": 1})]


class GridConfig(Model):
    dataset: list[str] = Field(min_length=1)
    method: list[str] = Field(min_length=1)
    mixture: list[MixtureType] = Field(default_factory=lambda: ["none", "mixup", "cutmix", "both"], min_length=1)
    prob: list[P] = Field(default_factory=lambda: [0.5], min_length=1)
    seed: list[int] = Field(default_factory=lambda: [0], min_length=1)


class AshaSettings(Model):
    """ASHA early stopping (Li et al., 2020) on the per-epoch kNN monitor; a stopped trial is KILLED
    in MLflow and shows as stopped in the results table."""

    metric: str = "monitor_knn_top1"
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(1, ge=1)  # epochs every trial runs before it can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)


class TuneSettings(Model):
    max_concurrent_trials: int | None = Field(None, ge=1)  # null: derived from the cluster's resources
    storage_path: str | None = None  # local path or s3://bucket/prefix; null: ~/ray_results/unmix
    # S3-compatible endpoint for s3:// storage (null: AWS, or $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)
    storage_endpoint_url: str | None = None
    trial_cpus: float = Field(0.0, ge=0.0)  # resources held by each trial's driver (it only waits on Train)
    # Custom resources each trial's driver also holds, e.g. {trial_driver: 1} to keep drivers on the
    # cluster head that advertises them (cluster/aws-gpu.yaml). Both left at zero: one trial_driver
    # slot where the cluster offers one (the embedded local Ray does), else 0.01 CPU.
    trial_resources: dict[str, Annotated[float, Field(ge=0.0)]] = Field(default_factory=dict)
    asha: AshaSettings | None = None  # null: every trial runs to the end; else ASHA within each dataset/method cell
    # How long a trial waits for its workers to be placed (an autoscaling cluster brings nodes up meanwhile)
    # before it fails with a message naming what it waits for; the data check on a node waits as long.
    placement_timeout_s: float = Field(1800.0, gt=0.0)
    log_encoder: bool = True  # each finished trial's encoder as an MLflow model of its run
    system_metrics_s: float = Field(30.0, ge=0.0)  # seconds between system-metric samples of a trial (0: off)


class SweepConfig(Model):
    name: str
    grid: GridConfig
    experiment: str = "unmix-ray"
    mixture_beta: float = Field(1.0, gt=0.0)
    untrained_reference: bool = True
    # The untrained encoder of every seed, or of the first only (a reference, not a compared variant).
    untrained_seeds: Literal["all", "first"] = "all"
    train: dict[str, Any] = Field(default_factory=dict)
    # Per-recipe changes to ``train``, keyed by a method name, a dataset name or "dataset/method";
    # merged in that order (the most specific wins). See ``unmix_ray.compose.trial_train``.
    train_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)
    # Changes to configs/datasets/ and configs/methods/, keyed like train_overrides; merged per cell:
    # datasets: dataset, method, dataset/method; methods: method, dataset, dataset/method (see compose).
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tune: TuneSettings = Field(default_factory=TuneSettings)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: its settings and the fully resolved trials it will run."""

    config: SweepConfig
    trials: list[TrialConfig]

    @property
    def name(self) -> str:
        return self.config.name
