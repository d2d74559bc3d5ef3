"""The trial plan of a sweep and its GPU-hour estimate: what ``--dry-run`` prints.

Nothing here starts Ray. The estimate multiplies, per trial, the samples it will process
(dataset size from ``configs/throughput.yaml``, whole batches only, times epochs, times the Un-Mix
cost factor of its method) by the throughput figure for its dataset x backbone x method on the GPU
type it will land on, plus the feature passes of its kNN/linear evaluations. Each figure in the
table names its source; most are documented estimates until measured, and the plan says so. A measured
figure is used before an estimate (see ``ThroughputTable.rate``), and the plan names the command that
measured it.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from unmix_ray.compose import load_sweep
from unmix_ray.config import Sweep, TrialConfig
from unmix_ray.orchestration.resources import (
    ClusterSpec,
    HeadMemory,
    fmt_resources,
    head_limited,
    load_cluster,
    load_head_memory,
    sweep_max_concurrent,
)
from unmix_ray.orchestration.throughput import ThroughputTable, load_throughput

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "cluster"
DEFAULT_CLUSTER = CLUSTER_DIR / "aws-gpu.yaml"


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
    figure_gpu: str | None = None  # the GPU the throughput figure was given for
    command: str | None = None  # the command that measured the figure, when measured
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
    head_memory: HeadMemory | None = None  # the model behind head_memory_needed
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
    rate = table.rate(ds.name, t.backbone, trial.method.name, gpu_type)
    if rate is None:
        key = f"{ds.name}/{t.backbone}/{trial.method.name}"
        return without(f"no throughput figure for {key}", gpu_type=gpu_type)
    samples = (n_train // t.batch_size) * t.batch_size * t.epochs
    mixed = trial.mixture.type != "none" and t.epochs
    factor = rate.unmix_factor if mixed else 1.0
    params = trial.method.params
    if params.get("symmetric"):
        # Symmetric MoCo runs the base step for each view as the query: twice the cost. The authors'
        # form reuses one mixed pass for both halves; "both_views" mixes the second view too.
        extra = (rate.unmix_factor - 1) * (2 if params.get("symmetric_mix") == "both_views" else 1)
        factor = 2 + (extra if mixed else 0)
    pretrain_h = samples * factor / rate.samples_per_s / 3600
    # Evaluation: feature passes (1 unit per image) over the labelled train and test splits, every
    # knn_every epochs and once at the end, spread over the trial's GPUs.
    every = trial.eval.knn_every
    n_evals = (t.epochs // every if every > 0 else 0) + 1
    eval_h = sum(n_eval) * n_evals / (rate.samples_per_s * rate.step_units) / 3600
    cost = (pretrain_h + eval_h) * table.gpu(gpu_type).usd_per_gpu_hour
    return replace(base, gpu_type=gpu_type, pretrain_samples=samples, pretrain_gpu_hours=pretrain_h,
                   eval_gpu_hours=eval_h, cost_usd=cost, measured=rate.measured, figure_gpu=rate.gpu,
                   command=rate.command)


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

    if isinstance(cluster, dict):
        spec = ClusterSpec.from_launcher(cluster, table)
    elif cluster is None or isinstance(cluster, ClusterSpec):
        spec = cluster
    else:
        spec = load_cluster(cluster, table)
    max_conc, note, wall = None, "", None
    head = load_head_memory()
    if spec is not None:
        try:
            max_conc = head_limited(sweep_max_concurrent(spec.nodes, sweep), spec, head)
        except ValueError as e:
            max_conc, note = 0, str(e)
        if by_type and spec.gpus_by_type:
            missing = [g for g in by_type if not spec.gpus_by_type.get(g)]
            if missing:
                note = note or f"the cluster has no {', '.join(missing)} GPUs"
            else:
                wall = max(h / spec.gpus_by_type[g] for g, h in by_type.items())
    return Plan(sweep.name, trials, dict(by_type), cost, len(used) - measured, measured, spec, max_conc, note,
                head_memory=head, wall_hours=wall)


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
        out += _measured_lines(plan.trials)
        if longest is not None:
            hours = longest.gpu_hours / longest.gpus
            out.append(f"  longest trial: {longest.run_name}, {_num(hours, 0)} hours "
                       f"({_num(hours / 24)} days) on {longest.gpus} {longest.gpu_type}")
    if plan.cluster is not None:
        c = plan.cluster
        gpus = ", ".join(f"{g} {n}" for g, n in sorted(c.gpus_by_type.items()))
        out.append(f"Cluster {c.name} at full scale: {len(c.nodes)} nodes, {fmt_resources(c.total)}"
                   + (f" ({gpus})" if gpus else ""))
        out.append(f"  max concurrent trials: {plan.max_concurrent}")
        if plan.head_memory is not None and plan.max_concurrent:
            h = plan.head_memory
            have = f" of the head's {c.head_memory_gib:g} GiB" if c.head_memory_gib else " (the head's is not stated)"
            out.append(f"  head memory needed: {plan.max_concurrent} running trials x {h.per_trial_gib:g} GiB + "
                       f"{h.base_gib:g} GiB = {h.needed_gib(plan.max_concurrent):.1f} GiB{have} "
                       f"({'measured' if h.measured else 'estimated'}: configs/head_memory.yaml)")
        if plan.wall_hours is not None:
            out.append(f"  ideal wall-clock at full scale (perfect packing): {_num(plan.wall_hours, 0)} "
                       f"hours ({_num(plan.wall_hours / 24)} days)")
        if plan.concurrency_note:
            out.append(f"  note: {plan.concurrency_note}")
    return "\n".join(out)


def _measured_lines(trials: list[TrialPlan]) -> list[str]:
    """One line per measuring command: the figures it gave, and the GPUs they were converted to."""
    by_command: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for t in trials:
        if t.measured and t.gpu_hours is not None:
            key = (t.command or "command not recorded", t.figure_gpu or "")
            by_command[key][f"{t.dataset}/{t.backbone}/{t.method}"].add(t.gpu_type or "")
    out = []
    for (command, on), figures in sorted(by_command.items()):
        scaled = sorted({g for gpus in figures.values() for g in gpus} - {on})
        note = f", converted to {', '.join(scaled)} by relative speed" if scaled else ""
        out.append(f"  measured on {on}{note}: {', '.join(sorted(figures))} by `{command}`")
    return out


def plan_for(sweep: Sweep, cluster: ClusterSpec | str | Path | None = None) -> Plan:
    """The plan ``--dry-run`` prints. Without ``cluster``: a GPU sweep is planned against
    ``cluster/aws-gpu.yaml``, a CPU sweep against this machine's CPUs."""
    if cluster is None:
        if any(t.train.use_gpu for t in sweep.trials):
            cluster = DEFAULT_CLUSTER
        else:
            cluster = ClusterSpec.from_resources({"CPU": float(os.cpu_count() or 1)}, "this machine")
    return plan_sweep(sweep, load_throughput(), cluster)


def dry_run(path: str | Path, overrides: list[str] = (), cluster: ClusterSpec | str | Path | None = None) -> str:
    """Validate a sweep and return its printed plan (``jobs/sweep.py --dry-run``). Raises ConfigError
    naming every config problem."""
    return format_plan(plan_for(load_sweep(path, overrides), cluster))
