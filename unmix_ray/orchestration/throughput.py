"""The throughput table of ``configs/throughput.yaml``: GPUs and their prices, where a trial lands by
its GPU count, each method's cost per sample, dataset sizes, and samples/s per dataset x backbone x
method on the reference GPU or on a named one. Every figure names its source; measured figures say so
and name the command that measured them.

Where several figures cover one dataset x backbone x method, ``rate`` takes a measured one before a
documented estimate, and among those a figure for the GPU the trial runs on before one converted
from another GPU by the table's relative speeds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import model_validator

from unmix_ray.config import CONFIG_DIR, Model, build, invalid

THROUGHPUT_PATH = CONFIG_DIR / "throughput.yaml"


class GpuSpec(Model):
    name: str
    relative_speed: float  # throughput relative to the table's reference GPU
    usd_per_gpu_hour: float
    instances: list[str]  # EC2 instance types carrying this GPU
    source: list[str]
    measured: bool = False  # relative_speed measured with this project's code (else a documented estimate)


class PlacementRule(Model):
    min_gpus: int
    gpu: str


class MethodCost(Model):
    name: str
    step_units: float  # backbone passes per sample of the base method (forward 1, forward+backward 3)
    unmix_extra_units: float  # what the Un-Mix mixture adds
    source: list[str]

    @property
    def unmix_factor(self) -> float:
        return (self.step_units + self.unmix_extra_units) / self.step_units


class DatasetSizes(Model):
    splits: dict[str, dict[str, int]]
    source: list[str]


class ThroughputGroup(Model):
    datasets: list[str]
    backbone: str
    samples_per_s: dict[str, float]  # method -> base-method samples/s per GPU of type ``gpu``
    source: list[str]
    measured: bool = False
    gpu: str | None = None  # the GPU the figures are for (default: the reference GPU)
    command: str | None = None  # the command that measured them (e.g. python bench/gpu.py --out ...)


@dataclass(frozen=True)
class Rate:
    samples_per_s: float  # on the GPU asked for (converted by relative speeds when the figure is for another)
    step_units: float
    unmix_factor: float
    measured: bool
    source: list[str]
    gpu: str = ""  # the GPU the figure was given for
    command: str | None = None


class ThroughputTable(Model):
    reference_gpu: str
    sources: dict[str, str]
    gpus: list[GpuSpec]
    placement: list[PlacementRule]
    methods: list[MethodCost]
    dataset_sizes: DatasetSizes
    throughput: list[ThroughputGroup]

    @model_validator(mode="after")
    def _consistent(self) -> ThroughputTable:
        """Every name refers to something the table defines, and every figure cites a source."""
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
            if group.gpu is not None and group.gpu not in gpu_names:
                out.append(f"throughput[{i}].gpu: unknown gpu {group.gpu!r}")
            on = group.gpu or self.reference_gpu
            kind = "measured" if group.measured else "estimated"
            for method, rate in group.samples_per_s.items():
                for d in group.datasets:
                    seen[d, group.backbone, method, on, kind] += 1
                if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
                    out.append(f"throughput[{i}].samples_per_s.{method}: must be a number > 0, got {rate!r}")
                if method not in {m.name for m in self.methods}:
                    out.append(f"throughput[{i}].samples_per_s.{method}: no methods entry (step units)")
        out += [f"throughput: {'/'.join(k[:3])} is given more than once ({k[4]}, for {k[3]})"
                for k, n in seen.items() if n > 1]
        if out:
            raise invalid("\n    ".join(out))
        return self

    def gpu(self, name: str) -> GpuSpec:
        return next(g for g in self.gpus if g.name == name)

    def gpu_for_trial(self, n_gpus: int) -> str | None:
        """The GPU type a trial with ``n_gpus`` GPUs lands on (first placement rule that fits)."""
        return next((r.gpu for r in self.placement if n_gpus >= r.min_gpus), None) if n_gpus else None

    def gpu_for_instance(self, instance_type: str) -> str | None:
        return next((g.name for g in self.gpus if instance_type in g.instances), None)

    def split_size(self, dataset: str, split: str) -> int | None:
        return self.dataset_sizes.splits.get(dataset, {}).get(split)

    def rate(self, dataset: str, backbone: str, method: str, gpu: str | None = None) -> Rate | None:
        """Samples/s of ``method`` on ``gpu`` (default: the reference GPU): a measured figure before an
        estimate, a figure for ``gpu`` itself before one converted from another GPU."""
        cost = next((m for m in self.methods if m.name == method), None)
        gpu = gpu or self.reference_gpu
        groups = [g for g in self.throughput
                  if dataset in g.datasets and g.backbone == backbone and method in g.samples_per_s]
        if cost is None or not groups:
            return None
        group = min(groups, key=lambda g: (not g.measured, (g.gpu or self.reference_gpu) != gpu))
        on = group.gpu or self.reference_gpu
        samples = float(group.samples_per_s[method]) * self.gpu(gpu).relative_speed / self.gpu(on).relative_speed
        return Rate(samples, cost.step_units, cost.unmix_factor, group.measured, group.source, on, group.command)


def load_throughput(path: str | Path = THROUGHPUT_PATH) -> ThroughputTable:
    with open(path) as f:
        return build(ThroughputTable, yaml.safe_load(f), str(path))
