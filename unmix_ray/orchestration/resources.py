"""Resource arithmetic: what a trial holds on a Ray cluster, how many trials fit at once, and the
cluster at full scale (a launcher config at its autoscaling bounds, or what Ray reports).
Nothing here starts Ray."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unmix_ray.config import Sweep, TrialConfig, TuneSettings
from unmix_ray.orchestration.throughput import ThroughputTable, load_throughput

RAY_BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # the launcher config, on a launched head




def worker_resources(trial: TrialConfig) -> dict[str, float]:
    """What one Ray Train worker of ``trial`` reserves."""
    need = {"CPU": float(trial.train.cpus_per_worker)}
    if trial.train.use_gpu:
        need["GPU"] = 1.0
    return need


def driver_resources(tune: TuneSettings) -> dict[str, float]:
    """What each trial's driver (the Tune function that builds the TorchTrainer) reserves: pass this
    to ``tune.with_resources``."""
    return {"CPU": float(tune.trial_cpus), **{k: float(v) for k, v in tune.trial_resources.items()}}


def trial_resources(trial: TrialConfig, driver: dict[str, float] | None = None) -> dict[str, float]:
    """Everything one running trial holds: its driver plus all its Train workers."""
    total: dict[str, float] = defaultdict(float)
    for name, amount in (driver or {}).items():
        total[name] += amount
    for name, amount in worker_resources(trial).items():
        total[name] += amount * trial.train.num_workers
    return {k: v for k, v in total.items() if v > 0}


def _fits(have: float, need: float) -> int:
    return math.floor(have / need + 1e-9)


def _as_nodes(cluster_resources: dict[str, float] | list[dict[str, float]]) -> list[dict[str, float]]:
    return [cluster_resources] if isinstance(cluster_resources, dict) else list(cluster_resources)


def max_concurrent_trials(cluster_resources: dict[str, float] | list[dict[str, float]], trial: TrialConfig,
                          driver: dict[str, float] | None = None) -> int:
    """How many copies of ``trial`` the cluster can run at once.

    ``cluster_resources`` is either one pooled dict (e.g. ``ray.cluster_resources()``) or a list
    with one dict per node (``ClusterSpec.nodes``), which also respects that a worker cannot span
    nodes. The trial's Train workers must all fit (Train starts only then), and the drivers
    (``driver``, e.g. ``driver_resources(sweep.config.tune)``) must fit as well. 0 means never.
    """
    nodes = _as_nodes(cluster_resources)
    total: dict[str, float] = defaultdict(float)
    for node in nodes:
        for name, amount in node.items():
            total[name] += amount
    per_trial = trial_resources(trial, driver)
    if not per_trial:
        raise ValueError(f"{trial.run_name}: reserves no resources, so its concurrency is unbounded")
    pooled = min(_fits(total.get(name, 0.0), amount) for name, amount in per_trial.items())
    need = {k: v for k, v in worker_resources(trial).items() if v > 0}
    if not need:
        return pooled
    slots = sum(min(_fits(node.get(name, 0.0), amount) for name, amount in need.items()) for node in nodes)
    return min(pooled, slots // trial.train.num_workers)


def sweep_max_concurrent(cluster_resources: dict[str, float] | list[dict[str, float]], sweep: Sweep) -> int:
    """``max_concurrent_trials`` for a whole sweep: what its cheapest trial allows (bigger trials
    then wait for their GPUs inside Train). Raises ValueError naming any trial that can never start."""
    driver = driver_resources(sweep.config.tune)
    counts: dict[str, int] = {}
    for trial in sweep.trials:
        counts[trial.run_name] = max_concurrent_trials(cluster_resources, trial, driver)
    never = [name for name, n in counts.items() if n == 0]
    if never:
        worst = next(t for t in sweep.trials if t.run_name == never[0])
        raise ValueError(
            f"{len(never)} trial(s) can never start on this cluster, e.g. {never[0]} needs "
            f"{fmt_resources(trial_resources(worst, driver))}; the cluster has "
            f"{fmt_resources(_pooled(cluster_resources))}")
    return max(counts.values()) if counts else 0


def _pooled(cluster_resources: dict[str, float] | list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for node in _as_nodes(cluster_resources):
        for name, amount in node.items():
            total[name] += amount
    return dict(total)


def fmt_resources(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster at full scale: one resource dict per node, and its GPUs by type."""

    name: str
    nodes: list[dict[str, float]]
    gpus_by_type: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> dict[str, float]:
        return _pooled(self.nodes)

    @classmethod
    def from_resources(cls, resources: dict[str, float], name: str = "cluster",
                       gpus_by_type: dict[str, int] | None = None) -> ClusterSpec:
        return cls(name, [dict(resources)], dict(gpus_by_type or {}))

    @classmethod
    def from_launcher(cls, config: dict[str, Any] | str | Path, table: ThroughputTable | None = None,
                      name: str | None = None) -> ClusterSpec:
        """A Ray cluster launcher config at its autoscaling bounds: the head plus ``max_workers``
        of every worker type (capped by the global ``max_workers``, filled in type order)."""
        if not isinstance(config, dict):
            path = Path(config).expanduser().resolve()
            here = Path.cwd()
            name = name or str(path.relative_to(here) if path.is_relative_to(here) else path)
            with open(path) as f:
                config = yaml.safe_load(f)
        table = table or load_throughput()
        types = config["available_node_types"]
        head = config["head_node_type"]
        budget = config.get("max_workers", math.inf)
        nodes: list[dict[str, float]] = []
        gpus: Counter = Counter()
        for type_name, spec in types.items():
            count = 1 if type_name == head else min(spec.get("max_workers", 0), budget)
            if type_name != head:
                budget -= count
            resources = {k: float(v) for k, v in spec.get("resources", {}).items()}
            nodes += [dict(resources) for _ in range(count)]
            gpu = table.gpu_for_instance(spec.get("node_config", {}).get("InstanceType", ""))
            if gpu and resources.get("GPU"):
                gpus[gpu] += int(resources["GPU"]) * count
        return cls(name or config.get("cluster_name", "cluster"), nodes, dict(gpus))


def runtime_cluster(resources: dict[str, float], table: ThroughputTable | None = None) -> ClusterSpec:
    """The cluster a sweep runs on: on a head started by the Ray cluster launcher, its launcher
    config at full scale (an autoscaling cluster starts with no GPUs); elsewhere ``resources``
    (pass ``ray.cluster_resources()``)."""
    bootstrap = RAY_BOOTSTRAP_CONFIG.expanduser()
    if bootstrap.is_file():
        return ClusterSpec.from_launcher(bootstrap, table, name="this cluster (launcher config)")
    return ClusterSpec.from_resources(resources, "this cluster")
