"""Data checked before any trial starts: the cheap checks of ``unmix_ray.data.preflight`` for every
dataset a sweep reads, here for data on this machine, and once on a cluster node (with the resources a
trial of that dataset asks for) for data that lives only on the nodes. One message per problem, naming
the file and the layout, instead of one failed trial per trial."""

from __future__ import annotations

import os
from pathlib import Path

import ray

from unmix_ray.config import DatasetConfig, Sweep
from unmix_ray.data import preflight
from unmix_ray.orchestration.resources import ClusterSpec, Placement, sweep_max_concurrent


def _datasets(sweep: Sweep) -> dict[str, tuple[DatasetConfig, str]]:
    """Each distinct dataset config of the sweep (cells may differ in augmentation only), with the name
    of its first trial."""
    out: dict[str, tuple[DatasetConfig, str]] = {}
    for t in sweep.trials:
        ds = t.dataset
        key = repr((ds.name, ds.root, ds.loader_module, ds.source, ds.download, sorted(ds.loader_options.items()),
                    ds.pretrain_splits, ds.train_split, ds.test_split))
        out.setdefault(key, (ds, t.run_name))
    return out


def is_here(ds: DatasetConfig) -> bool:
    """Whether this machine holds (or will fetch) the dataset's files."""
    return bool(ds.source or ds.download) or Path(ds.root).expanduser().exists()


def check_local_data(sweep: Sweep, absent_is_remote: bool) -> list[str]:
    """Problems with the data on this machine; with ``absent_is_remote``, a dataset whose root is not
    here is left to ``check_remote_data`` (it lives on the cluster's nodes)."""
    problems: list[str] = []
    for ds, _ in _datasets(sweep).values():
        if not is_here(ds) and absent_is_remote:
            continue
        problems += [p for p in preflight(ds) if p not in problems]
    return problems


def local_feasibility(sweep: Sweep) -> list[str]:
    """Whether every trial fits on this machine (CPUs, CUDA GPUs) before an embedded Ray is started."""
    import torch

    here = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count()), "trial_driver": 64.0}
    try:
        sweep_max_concurrent(ClusterSpec.from_resources(here, "this machine").nodes, sweep)
    except ValueError as e:
        return [f"{e} (this machine; a GPU sweep runs on a cluster: docs/cluster.md)"]
    return []


@ray.remote(num_cpus=0)
def _preflight_on_node(ds: dict) -> list[str]:
    return preflight(DatasetConfig.model_validate(ds))


def check_remote_data(sweep: Sweep, placements: dict[str, Placement], timeout_s: float) -> list[str]:
    """Problems with data that lives only on the cluster's nodes, checked on one node each (a node of the
    kind the dataset's trials run on), waiting at most ``timeout_s`` for such a node."""
    pending = {}
    for ds, run_name in _datasets(sweep).values():
        if is_here(ds):
            continue
        need = placements[run_name].resources_per_worker
        resources = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
        task = _preflight_on_node.options(num_gpus=need.get("GPU", 0), resources=resources or None)
        pending[task.remote(ds.to_dict())] = (ds, need)
    problems: list[str] = []
    for ref, (ds, need) in pending.items():
        try:
            problems += [p for p in ray.get(ref, timeout=timeout_s) if p not in problems]
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref, force=True)
            problems.append(f"{ds.name}: {ds.root} is not on this machine, and no node with "
                            f"{', '.join(f'{k} {v:g}' for k, v in sorted(need.items()))} came up within "
                            f"{timeout_s:.0f} s to check it there (tune.placement_timeout_s)")
    return problems
