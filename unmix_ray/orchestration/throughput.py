"""The throughput table of ``configs/throughput.yaml``: GPUs and their prices, where a trial lands by
its GPU count, each method's cost per sample, dataset sizes, and samples/s per dataset x backbone x
method on the reference GPU. Every figure names its source; measured figures say so.
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
            for method, rate in group.samples_per_s.items():
                for d in group.datasets:
                    seen[d, group.backbone, method] += 1
                if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0:
                    out.append(f"throughput[{i}].samples_per_s.{method}: must be a number > 0, got {rate!r}")
                if method not in {m.name for m in self.methods}:
                    out.append(f"throughput[{i}].samples_per_s.{method}: no methods entry (step units)")
        out += [f"throughput: {'/'.join(k)} is given more than once" for k, n in seen.items() if n > 1]
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
