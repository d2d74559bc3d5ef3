"""The trial plan of a sweep and its GPU-hour estimate (what ``--dry-run`` prints), and how many
trials a cluster can run at once.

Nothing here starts Ray. The estimate multiplies, per trial, the samples it will process
(dataset size from ``configs/throughput.yaml``, whole batches only, times epochs, times the Un-Mix
cost factor of its method) by the throughput figure for its dataset x backbone x method on the GPU
type it will land on, plus the feature passes of its kNN/linear evaluations. Each figure in the
table names its source; most are documented estimates until measured, and the plan says so.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from unmix_ray.config import CONFIG_DIR, Sweep, TrialConfig, TuneSettings, load_sweep
from unmix_ray.schema import build

THROUGHPUT_PATH = CONFIG_DIR / "throughput.yaml"
CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"
DEFAULT_CLUSTER = CLUSTER_DIR / "aws-gpu.yaml"
RAY_BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # the launcher config, on a launched head


# ----------------------------------------------------------------------------------------------
# The throughput table


@dataclass(frozen=True)
class GpuSpec:
    name: str
    relative_speed: float  # throughput relative to the table's reference GPU
    usd_per_gpu_hour: float
    instances: list[str]  # EC2 instance types carrying this GPU
    source: list[str]


@dataclass(frozen=True)
class PlacementRule:
    min_gpus: int
    gpu: str


@dataclass(frozen=True)
class MethodCost:
    name: str
    step_units: float  # backbone passes per sample of the base method (forward 1, forward+backward 3)
    unmix_extra_units: float  # what the Un-Mix mixture adds
    source: list[str]

    @property
    def unmix_factor(self) -> float:
        return (self.step_units + self.unmix_extra_units) / self.step_units


@dataclass(frozen=True)
class DatasetSizes:
    splits: dict[str, dict[str, int]]
    source: list[str]


@dataclass(frozen=True)
class ThroughputGroup:
    datasets: list[str]
    backbone: str
    samples_per_s: dict[str, float]  # method -> base-method samples/s per reference GPU
    source: list[str]
    measured: bool = False


@dataclass(frozen=True)
class Rate:
    samples_per_s: float
    step_units: float
    unmix_factor: float
    measured: bool
    source: list[str]


@dataclass(frozen=True)
class ThroughputTable:
    reference_gpu: str
    sources: dict[str, str]
    gpus: list[GpuSpec]
    placement: list[PlacementRule]
    methods: list[MethodCost]
    dataset_sizes: DatasetSizes
    throughput: list[ThroughputGroup]

    def problems(self) -> list[str]:
        out = []
        gpu_names = {g.name for g in self.gpus}
        if self.reference_gpu not in gpu_names:
            out.append(f"reference_gpu: {self.reference_gpu!r} is not one of the gpus")
        for rule in self.placement:
            if rule.gpu not in gpu_names:
                out.append(f"placement: unknown gpu {rule.gpu!r}")
        cited = [(f"gpus.{g.name}", g.source) for g in self.gpus]
        cited += [(f"methods.{m.name}", m.source) for m in self.methods]
        cited += [("dataset_sizes", self.dataset_sizes.source)]
        cited += [(f"throughput[{i}]", g.source) for i, g in enumerate(self.throughput)]
        for where, keys in cited:
            if not keys:
                out.append(f"{where}: names no source")
            out += [f"{where}: unknown source {k!r}" for k in keys if k not in self.sources]
        for m in self.methods:
            if m.step_units <= 0 or m.unmix_extra_units < 0:
                out.append(f"methods.{m.name}: step_units must be > 0 and unmix_extra_units >= 0")
        seen: Counter = Counter()
        for i, group in enumerate(self.throughput):
            for method, rate in group.samples_per_s.items():
                for d in group.datasets:
                    seen[d, group.backbone, method] += 1
                if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
                    out.append(f"throughput[{i}].samples_per_s.{method}: must be a number > 0, got {rate!r}")
                if method not in {m.name for m in self.methods}:
                    out.append(f"throughput[{i}].samples_per_s.{method}: no methods entry (step units)")
        out += [f"throughput: {'/'.join(k)} is given more than once" for k, n in seen.items() if n > 1]
        return out

    def gpu(self, name: str) -> GpuSpec:
        return next(g for g in self.gpus if g.name == name)

    def gpu_for_trial(self, n_gpus: int) -> str | None:
        """The GPU type a trial with ``n_gpus`` GPUs lands on (first placement rule that fits)."""
        return next((r.gpu for r in self.placement if n_gpus >= r.min_gpus), None) if n_gpus else None

    def gpu_for_instance(self, instance_type: str) -> str | None:
        return next((g.name for g in self.gpus if instance_type in g.instances), None)

    def split_size(self, dataset: str, split: str) -> int | None:
        return self.dataset_sizes.splits.get(dataset, {}).get(split)

    def rate(self, dataset: str, backbone: str, method: str) -> Rate | None:
        cost = next((m for m in self.methods if m.name == method), None)
        for group in self.throughput:
            if dataset in group.datasets and group.backbone == backbone and method in group.samples_per_s:
                if cost is None:
                    return None
                return Rate(float(group.samples_per_s[method]), cost.step_units, cost.unmix_factor,
                            group.measured, group.source)
        return None


def load_throughput(path: str | Path = THROUGHPUT_PATH) -> ThroughputTable:
    with open(path) as f:
        return build(ThroughputTable, yaml.safe_load(f), str(path))


# ----------------------------------------------------------------------------------------------
# Resources and concurrency


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
            f"{_fmt_resources(trial_resources(worst, driver))}; the cluster has "
            f"{_fmt_resources(_pooled(cluster_resources))}")
    return max(counts.values()) if counts else 0


def _pooled(cluster_resources: dict[str, float] | list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for node in _as_nodes(cluster_resources):
        for name, amount in node.items():
            total[name] += amount
    return dict(total)


def _fmt_resources(resources: dict[str, float]) -> str:
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


# ----------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class TrialPlan:
    run_name: str
    dataset: str
    method: str
    variant: str
    seed: int
    backbone: str
    workers: int
    gpus: int
    cpus: float
    epochs: int
    batch_size: int
    gpu_type: str | None = None
    pretrain_samples: int | None = None  # samples through the training step, all epochs
    pretrain_gpu_hours: float | None = None
    eval_gpu_hours: float | None = None
    cost_usd: float | None = None
    measured: bool = False
    note: str = ""  # why there is no estimate

    @property
    def gpu_hours(self) -> float | None:
        if self.pretrain_gpu_hours is None or self.eval_gpu_hours is None:
            return None
        return self.pretrain_gpu_hours + self.eval_gpu_hours


@dataclass(frozen=True)
class Plan:
    sweep: str
    trials: list[TrialPlan]
    gpu_hours_by_type: dict[str, float]
    cost_usd: float
    figures_estimated: int
    figures_measured: int
    cluster: ClusterSpec | None = None
    max_concurrent: int | None = None
    concurrency_note: str = ""
    wall_hours: float | None = None

    @property
    def total_gpu_hours(self) -> float:
        return sum(self.gpu_hours_by_type.values())

    @property
    def longest_trial(self) -> TrialPlan | None:
        """The trial with the longest wall-clock time on its own GPUs."""
        timed = [t for t in self.trials if t.gpu_hours is not None and t.gpus]
        return max(timed, key=lambda t: t.gpu_hours / t.gpus, default=None)

    @property
    def unestimated(self) -> list[TrialPlan]:
        return [t for t in self.trials if t.gpus and t.gpu_hours is None]


def _samples(table: ThroughputTable, trial: TrialConfig, splits: tuple[str, ...] | list[str],
             subset: int | None) -> int | None:
    sizes = [table.split_size(trial.dataset.name, s) for s in splits]
    if any(s is None for s in sizes):
        return None
    n = sum(sizes)
    return min(n, subset) if subset is not None else n


def estimate_trial(trial: TrialConfig, table: ThroughputTable) -> TrialPlan:
    """One trial's line of the plan, with its GPU-hours and cost where the table allows."""
    t = trial.train
    gpus = t.num_workers if t.use_gpu else 0
    base = TrialPlan(trial.run_name, trial.dataset.name, trial.method.name, trial.variant, trial.seed,
                     t.backbone, t.num_workers, gpus, t.num_workers * t.cpus_per_worker, t.epochs,
                     t.batch_size)

    def without(note: str, **kw: Any) -> TrialPlan:
        return replace(base, note=note, **kw)

    if not gpus:
        return without("CPU trial: no GPU-hours")
    gpu_type = table.gpu_for_trial(gpus)
    if gpu_type is None:
        return without(f"no placement rule for {gpus} GPU(s)")
    ds = trial.dataset
    n_train = _samples(table, trial, ds.pretrain_splits, ds.train_subset)
    n_eval = [_samples(table, trial, [ds.train_split], ds.train_subset),
              _samples(table, trial, [ds.test_split], ds.test_subset)]
    if n_train is None or None in n_eval:
        splits = sorted({*ds.pretrain_splits, ds.train_split, ds.test_split})
        return without(f"no size for a split of {ds.name} ({', '.join(splits)}) in the throughput table",
                       gpu_type=gpu_type)
    rate = table.rate(ds.name, t.backbone, trial.method.name)
    if rate is None:
        key = f"{ds.name}/{t.backbone}/{trial.method.name}"
        return without(f"no throughput figure for {key}", gpu_type=gpu_type)
    speed = table.gpu(gpu_type).relative_speed
    samples = (n_train // t.batch_size) * t.batch_size * t.epochs
    factor = rate.unmix_factor if trial.mixture.type != "none" and t.epochs else 1.0
    pretrain_h = samples * factor / (rate.samples_per_s * speed) / 3600
    # Evaluation: feature passes (1 unit per image) over the labelled train and test splits, every
    # knn_every epochs and once at the end, spread over the trial's GPUs.
    every = trial.eval.knn_every
    n_evals = (t.epochs // every if every > 0 else 0) + 1
    eval_h = sum(n_eval) * n_evals / (rate.samples_per_s * rate.step_units * speed) / 3600
    cost = (pretrain_h + eval_h) * table.gpu(gpu_type).usd_per_gpu_hour
    return replace(base, gpu_type=gpu_type, pretrain_samples=samples, pretrain_gpu_hours=pretrain_h,
                   eval_gpu_hours=eval_h, cost_usd=cost, measured=rate.measured)


def plan_sweep(sweep: Sweep, table: ThroughputTable | None = None,
               cluster: ClusterSpec | dict[str, Any] | str | Path | None = None) -> Plan:
    """Plan every trial of a validated sweep; with a cluster (a ``ClusterSpec``, a launcher config
    or its path) also the concurrency and the ideal wall-clock time at full scale."""
    table = table or load_throughput()
    trials = [estimate_trial(t, table) for t in sweep.trials]
    by_type: dict[str, float] = defaultdict(float)
    for tp in trials:
        if tp.gpu_hours is not None:
            by_type[tp.gpu_type] += tp.gpu_hours
    cost = sum(tp.cost_usd for tp in trials if tp.cost_usd is not None)
    used = {(tp.dataset, tp.backbone, tp.method): tp.measured for tp in trials if tp.gpu_hours is not None}
    measured = sum(used.values())

    spec = cluster if isinstance(cluster, ClusterSpec) or cluster is None else ClusterSpec.from_launcher(
        cluster, table)
    max_conc, note, wall = None, "", None
    if spec is not None:
        try:
            max_conc = sweep_max_concurrent(spec.nodes, sweep)
        except ValueError as e:
            max_conc, note = 0, str(e)
        if by_type and spec.gpus_by_type:
            missing = [g for g in by_type if not spec.gpus_by_type.get(g)]
            if missing:
                note = note or f"the cluster has no {', '.join(missing)} GPUs"
            else:
                wall = max(h / spec.gpus_by_type[g] for g, h in by_type.items())
    return Plan(sweep.name, trials, dict(by_type), cost, len(used) - measured, measured, spec, max_conc, note,
                wall)


def _num(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def format_plan(plan: Plan) -> str:
    """The plan as text: one line per trial, then the totals and what they rest on."""
    cols = ["run name", "dataset", "method", "variant", "seed", "workers", "GPUs", "epochs", "gpu", "GPU-h"]
    rows = [[t.run_name, t.dataset, t.method, t.variant, str(t.seed), str(t.workers), str(t.gpus),
             str(t.epochs), t.gpu_type or "-", _num(t.gpu_hours)] for t in plan.trials]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    right = {4, 5, 6, 7, 9}

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if i in right else c.ljust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded).rstrip()

    trained = sum(t.variant != "untrained" for t in plan.trials)
    out = [f"Sweep {plan.sweep!r}: {len(plan.trials)} trials ({trained} pretraining, "
           f"{len(plan.trials) - trained} untrained-encoder references)", "", line(cols)]
    out += [line(r) for r in rows]
    out.append("")
    notes = Counter(t.note for t in plan.trials if t.note)
    for note, n in sorted(notes.items()):
        out.append(f"no estimate for {n} trial(s): {note}")
    if plan.gpu_hours_by_type:
        parts = ", ".join(f"{g} {_num(h, 0)}" for g, h in sorted(plan.gpu_hours_by_type.items()))
        out.append(f"GPU-hours (estimate): {parts}; total {_num(plan.total_gpu_hours, 0)} GPU-hours, "
                   f"about {_num(plan.cost_usd, 0)} USD at on-demand prices")
        evals = sum(t.eval_gpu_hours or 0 for t in plan.trials)
        longest = plan.longest_trial
        out.append(f"  of which evaluation (kNN monitor, final features): {_num(evals, 0)} GPU-hours")
        total = plan.figures_estimated + plan.figures_measured
        out.append(f"  throughput figures used: {total}, of which {plan.figures_estimated} documented "
                   f"estimates and {plan.figures_measured} measured (sources: configs/throughput.yaml)")
        if longest is not None:
            hours = longest.gpu_hours / longest.gpus
            out.append(f"  longest trial: {longest.run_name}, {_num(hours, 0)} hours "
                       f"({_num(hours / 24)} days) on {longest.gpus} {longest.gpu_type}")
    if plan.cluster is not None:
        c = plan.cluster
        gpus = ", ".join(f"{g} {n}" for g, n in sorted(c.gpus_by_type.items()))
        out.append(f"Cluster {c.name} at full scale: {len(c.nodes)} nodes, {_fmt_resources(c.total)}"
                   + (f" ({gpus})" if gpus else ""))
        out.append(f"  max concurrent trials: {plan.max_concurrent}")
        if plan.wall_hours is not None:
            out.append(f"  ideal wall-clock at full scale (perfect packing): {_num(plan.wall_hours, 0)} "
                       f"hours ({_num(plan.wall_hours / 24)} days)")
        if plan.concurrency_note:
            out.append(f"  note: {plan.concurrency_note}")
    return "\n".join(out)


def dry_run(path: str | Path, overrides: list[str] = (),
            cluster: ClusterSpec | str | Path | None = None) -> str:
    """Validate a sweep and return its printed plan (``jobs/sweep.py --dry-run``). Without
    ``cluster``: a GPU sweep is planned against ``cluster/aws-gpu.yaml``, a CPU sweep against this
    machine's CPUs. Raises ConfigError naming every config problem."""
    sweep = load_sweep(path, overrides)
    if cluster is None:
        if any(t.train.use_gpu for t in sweep.trials):
            cluster = DEFAULT_CLUSTER
        else:
            cluster = ClusterSpec.from_resources({"CPU": float(os.cpu_count() or 1)}, "this machine")
    return format_plan(plan_sweep(sweep, load_throughput(), cluster))
