"""Resource arithmetic: what a trial holds on a Ray cluster, how many trials fit at once, and the
cluster at full scale (a launcher config at its autoscaling bounds, or what Ray reports).
Nothing here starts Ray."""

from __future__ import annotations

import json
import math
import re
import shlex
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from unmix_ray.config import CONFIG_DIR, Model, Sweep, TrialConfig, TuneSettings, build
from unmix_ray.orchestration.throughput import ThroughputTable, load_throughput

RAY_BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # the launcher config, on a launched head
HEAD_MEMORY_PATH = CONFIG_DIR / "head_memory.yaml"


class HeadMemory(Model):
    """What a sweep needs on the head: ``per_trial_gib`` for each running trial (its Tune driver, Ray
    Train's controller and placement-group cleaner) and ``base_gib`` besides (configs/head_memory.yaml)."""

    per_trial_gib: float = Field(gt=0)
    base_gib: float = Field(ge=0)
    measured: bool = False
    command: str = ""
    usable_fraction: float = Field(0.9, gt=0, le=1)
    instances: dict[str, float] = Field(default_factory=dict)

    def needed_gib(self, trials: int) -> float:
        return trials * self.per_trial_gib + self.base_gib

    def capacity(self, head_gib: float) -> int:
        """Trials a head of ``head_gib`` holds at once."""
        return max(0, math.floor((self.usable_fraction * head_gib - self.base_gib) / self.per_trial_gib + 1e-9))


def head_limited(max_concurrent: int, spec: ClusterSpec, head: HeadMemory | None = None) -> int:
    """``max_concurrent`` capped to what the cluster's head holds, where the cluster states its memory."""
    if spec.head_memory_gib is None:
        return max_concurrent
    return min(max_concurrent, (head or load_head_memory()).capacity(spec.head_memory_gib))


def load_head_memory(path: str | Path = HEAD_MEMORY_PATH) -> HeadMemory:
    with open(path) as f:
        return build(HeadMemory, yaml.safe_load(f), str(path))


def _gib(quantity: Any) -> float | None:
    """A Kubernetes memory quantity (e.g. ``56Gi``) in GiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?", str(quantity).strip())
    if not m:
        return None
    scale = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "K": 1e3 / 2**30, "M": 1e6 / 2**30,
             "G": 1e9 / 2**30, "T": 1e12 / 2**30}
    return float(m.group(1)) * (scale[m.group(2)] if m.group(2) else 2**-30)




ACCELERATOR = "accelerator_type:"  # Ray's resource for a node's GPU kind, e.g. accelerator_type:A10G


@dataclass(frozen=True)
class Placement:
    """Where one trial's Ray Train workers go: what each reserves, the GPU kind it asks for (the
    placement rule of ``configs/throughput.yaml``, as Ray's accelerator type), and how the workers are
    packed (a multi-GPU trial on GPUs of one kind stays on one node)."""

    resources_per_worker: dict[str, float]
    accelerator_type: str | None = None
    strategy: str = "PACK"


def declared_accelerators(nodes: list[dict[str, float]]) -> set[str]:
    """The GPU kinds a cluster's nodes declare (``accelerator_type:<KIND>`` resources)."""
    return {k.removeprefix(ACCELERATOR) for node in nodes for k in node if k.startswith(ACCELERATOR)}


def trial_placement(trial: TrialConfig, table: ThroughputTable | None = None,
                    accelerators: set[str] = frozenset()) -> Placement:
    """The placement of ``trial`` on a cluster that declares ``accelerators``: a GPU trial asks for the
    kind its GPU count is planned on (so 1-GPU trials never take an 8-GPU node), where the cluster
    declares kinds at all; a local machine without declared kinds takes any GPU."""
    t = trial.train
    need = {"CPU": float(t.cpus_per_worker)}
    if not t.use_gpu:
        return Placement(need)
    need["GPU"] = 1.0
    kind = (table or load_throughput()).gpu_for_trial(t.num_workers)
    accelerator = kind.upper() if kind and kind.upper() in accelerators else None
    if accelerator is None:
        return Placement(need)
    need[ACCELERATOR + accelerator] = 0.001  # what ScalingConfig(accelerator_type=...) adds
    return Placement(need, accelerator, "STRICT_PACK" if t.num_workers > 1 else "PACK")


def worker_resources(trial: TrialConfig, placement: Placement | None = None) -> dict[str, float]:
    """What one Ray Train worker of ``trial`` reserves."""
    return dict((placement or trial_placement(trial)).resources_per_worker)


def driver_resources(tune: TuneSettings) -> dict[str, float]:
    """What each trial's driver (the Tune function that builds the TorchTrainer) reserves: pass this
    to ``tune.with_resources``."""
    return {"CPU": float(tune.trial_cpus), **{k: float(v) for k, v in tune.trial_resources.items()}}


def trial_resources(trial: TrialConfig, driver: dict[str, float] | None = None,
                    placement: Placement | None = None) -> dict[str, float]:
    """Everything one running trial holds: its driver plus all its Train workers."""
    total: dict[str, float] = defaultdict(float)
    for name, amount in (driver or {}).items():
        total[name] += amount
    for name, amount in worker_resources(trial, placement).items():
        total[name] += amount * trial.train.num_workers
    return {k: v for k, v in total.items() if v > 0}


def _fits(have: float, need: float) -> int:
    return math.floor(have / need + 1e-9)


def _as_nodes(cluster_resources: dict[str, float] | list[dict[str, float]]) -> list[dict[str, float]]:
    return [cluster_resources] if isinstance(cluster_resources, dict) else list(cluster_resources)


def max_concurrent_trials(cluster_resources: dict[str, float] | list[dict[str, float]], trial: TrialConfig,
                          driver: dict[str, float] | None = None, placement: Placement | None = None) -> int:
    """How many copies of ``trial`` the cluster can run at once.

    ``cluster_resources`` is either one pooled dict (e.g. ``ray.cluster_resources()``) or a list
    with one dict per node (``ClusterSpec.nodes``), which also respects that a worker cannot span
    nodes. The trial's Train workers must all fit (Train starts only then; a STRICT_PACK placement
    on one node), and the drivers (``driver``, e.g. ``driver_resources(sweep.config.tune)``) must fit
    as well. 0 means never.
    """
    placement = placement or trial_placement(trial)
    nodes = _as_nodes(cluster_resources)
    total: dict[str, float] = defaultdict(float)
    for node in nodes:
        for name, amount in node.items():
            total[name] += amount
    per_trial = trial_resources(trial, driver, placement)
    if not per_trial:
        raise ValueError(f"{trial.run_name}: reserves no resources, so its concurrency is unbounded")
    pooled = min(_fits(total.get(name, 0.0), amount) for name, amount in per_trial.items())
    need = {k: v for k, v in placement.resources_per_worker.items() if v > 0}
    if not need:
        return pooled
    per_node = [min(_fits(node.get(name, 0.0), amount) for name, amount in need.items()) for node in nodes]
    if placement.strategy == "STRICT_PACK":
        return min(pooled, sum(n // trial.train.num_workers for n in per_node))
    return min(pooled, sum(per_node) // trial.train.num_workers)


def sweep_placements(nodes: list[dict[str, float]], sweep: Sweep,
                     table: ThroughputTable | None = None) -> dict[str, Placement]:
    """Every trial's placement on a cluster with these nodes, by run name."""
    table = table or load_throughput()
    accelerators = declared_accelerators(nodes)
    return {t.run_name: trial_placement(t, table, accelerators) for t in sweep.trials}


def sweep_max_concurrent(cluster_resources: dict[str, float] | list[dict[str, float]], sweep: Sweep,
                         placements: dict[str, Placement] | None = None) -> int:
    """``max_concurrent_trials`` for a whole sweep: for each GPU kind, what its cheapest trial allows
    (bigger trials then wait for their GPUs inside Train), summed over the kinds, and no more than the
    trials' drivers allow. Raises ValueError naming the trials that can never start and what they need."""
    nodes = _as_nodes(cluster_resources)
    placements = placements or sweep_placements(nodes, sweep)
    driver = driver_resources(sweep.config.tune)
    counts: dict[str, int] = {}
    for trial in sweep.trials:
        counts[trial.run_name] = max_concurrent_trials(nodes, trial, driver, placements[trial.run_name])
    never = [name for name, n in counts.items() if n == 0]
    if never:
        worst = next(t for t in sweep.trials if t.run_name == never[0])
        place = placements[worst.run_name]
        workers = f"{worst.train.num_workers} worker(s) of {fmt_resources(place.resources_per_worker)}"
        if place.strategy == "STRICT_PACK":
            workers += " on one node"
        raise ValueError(
            f"{len(never)} of {len(sweep.trials)} trial(s) can never start on this cluster, e.g. {never[0]} "
            f"needs {workers} (and {fmt_resources(driver) if any(driver.values()) else 'no resources'} for its "
            f"driver); the cluster has at most {fmt_resources(_pooled(nodes))}")
    if not counts:
        return 0
    by_kind: dict[str | None, int] = defaultdict(int)  # GPU kinds are disjoint pools of nodes
    for name, n in counts.items():
        kind = placements[name].accelerator_type
        by_kind[kind] = max(by_kind[kind], n)
    total = sum(by_kind.values()) if None not in by_kind else max(counts.values())
    need = {k: v for k, v in driver.items() if v > 0}
    pooled = _pooled(nodes)
    drivers = min((_fits(pooled.get(k, 0.0), v) for k, v in need.items()), default=total)
    return min(total, drivers)


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
    head_memory_gib: float | None = None  # where the file says (launcher: its instance type; KubeRay: the pod)

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
            if gpu and resources.get("GPU") and count:
                gpus[gpu] += int(resources["GPU"]) * count
        instance = types[head].get("node_config", {}).get("InstanceType", "")
        return cls(name or config.get("cluster_name", "cluster"), nodes, dict(gpus),
                   load_head_memory().instances.get(instance))


    @classmethod
    def from_kuberay(cls, spec: dict[str, Any], table: ThroughputTable | None = None,
                     name: str = "RayCluster") -> ClusterSpec:
        """A KubeRay RayCluster spec (or a RayJob's ``rayClusterSpec``) at its autoscaling bounds: the
        head plus ``maxReplicas`` pods of every worker group, each with the resources Ray will see
        (``rayStartParams``, else the container's limits)."""
        table = table or load_throughput()
        nodes: list[dict[str, float]] = []
        gpus: Counter = Counter()
        groups = [(spec["headGroupSpec"], 1)] + [(g, int(g.get("maxReplicas", g.get("replicas", 0))))
                                                  for g in spec.get("workerGroupSpecs", [])]
        for group, count in groups:
            resources = _pod_resources(group)
            nodes += [dict(resources) for _ in range(count)]
            for kind in declared_accelerators([resources]):
                gpu = next((g.name for g in table.gpus if g.name.upper() == kind), None)
                if gpu and resources.get("GPU") and count:
                    gpus[gpu] += int(resources["GPU"]) * count
        requests = spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("resources", {})
        memory = requests.get("limits", {}).get("memory") or requests.get("requests", {}).get("memory")
        return cls(name, nodes, dict(gpus), _gib(memory) if memory else None)


def _pod_resources(group: dict[str, Any]) -> dict[str, float]:
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    cpu = params.get("num-cpus", limits.get("cpu", 0))
    out = {"CPU": float(str(cpu).rstrip("m")) / (1000 if str(cpu).endswith("m") else 1),
           "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    raw = params.get("resources")
    if raw:  # shell-quoted JSON, as `ray start --resources` takes it
        out |= {k: float(v) for k, v in json.loads(shlex.split(raw)[0]).items()}
    return {k: v for k, v in out.items() if v}


def load_cluster(path: str | Path, table: ThroughputTable | None = None) -> ClusterSpec:
    """The cluster a file describes: a Ray cluster launcher YAML, or a KubeRay RayCluster or RayJob
    manifest (the first such document of the file)."""
    path = Path(path).expanduser()
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
    for doc in docs:
        if "available_node_types" in doc:
            return ClusterSpec.from_launcher(doc, table, name=str(path))
        if doc.get("kind") == "RayCluster":
            return ClusterSpec.from_kuberay(doc["spec"], table, name=str(path))
        if doc.get("kind") == "RayJob":
            return ClusterSpec.from_kuberay(doc["spec"]["rayClusterSpec"], table, name=str(path))
    raise ValueError(f"{path}: neither a Ray cluster launcher config nor a KubeRay RayCluster/RayJob manifest")


def runtime_cluster(resources: dict[str, float], cluster: str | Path | None = None,
                    table: ThroughputTable | None = None) -> ClusterSpec:
    """The cluster a sweep runs on, at full scale where it autoscales (so a cluster that starts with no
    GPUs is not taken for one without any): the file ``cluster`` names (``--cluster``); on a head
    started by the Ray cluster launcher, its launcher config; elsewhere ``resources`` (pass
    ``ray.cluster_resources()``)."""
    if cluster is not None:
        return load_cluster(cluster, table)
    bootstrap = RAY_BOOTSTRAP_CONFIG.expanduser()
    if bootstrap.is_file():
        return ClusterSpec.from_launcher(bootstrap, table, name="this cluster (launcher config)")
    return ClusterSpec.from_resources(resources, "this cluster")
