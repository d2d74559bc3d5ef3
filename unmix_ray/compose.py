"""Compose a sweep YAML with ``configs/{datasets,methods}/`` into one typed TrialConfig per trial.

A sweep file names datasets and methods; each name is read from ``configs/datasets/<name>.yaml`` or
``configs/methods/<name>.yaml`` and the sweep's per-name overrides are merged on top. Everything is
validated here, against the method, backbone and dataset-loader registries, before Ray is touched,
and every problem is reported at once.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from unmix_ray.config import (
    CONFIG_DIR,
    ConfigError,
    DatasetConfig,
    EvalConfig,
    MethodConfig,
    MixtureConfig,
    Sweep,
    SweepConfig,
    TrainConfig,
    TrialConfig,
    apply_overrides,
    build,
    deep_merge,
    read_yaml,
)
from unmix_ray.methods import METHODS
from unmix_ray.models import BACKBONES


def known_names(kind: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The datasets or methods that have a YAML file in ``config_dir / kind``."""
    return sorted(p.stem for p in (config_dir / kind).glob("*.yaml"))


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
    return compose_sweep(apply_overrides(read_yaml(path), list(overrides)), config_dir, source=str(path))


def _train_block(merged: dict[str, Any], where: str, errors: list[str]) -> TrainConfig | None:
    backbone = merged.get("backbone", TrainConfig.model_fields["backbone"].default)
    unknown = isinstance(backbone, str) and backbone not in BACKBONES  # checked whatever else is wrong
    if unknown:
        errors.append(f"{where}.backbone: unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
    block = build(TrainConfig, merged, where, errors)
    return None if unknown else block


def _without_bad_fields(data: dict[str, Any]) -> SweepConfig | None:
    """The sweep with each field that failed validation left at its default (two levels deep), so that
    the datasets, methods and train blocks it names can still be checked and reported in the same run."""
    try:
        SweepConfig.model_validate(data)
    except ValidationError as e:
        cleaned = copy.deepcopy(data)
        for err in e.errors():
            loc = err["loc"]
            parent = cleaned.get(loc[0]) if len(loc) > 1 else None
            if isinstance(parent, dict) and isinstance(loc[1], str):
                parent.pop(loc[1], None)
            elif isinstance(cleaned, dict):
                cleaned.pop(loc[0], None)
        try:
            return SweepConfig.model_validate(cleaned)
        except ValidationError:
            return None
    return SweepConfig.model_validate(data)


def compose_sweep(data: dict[str, Any], config_dir: Path = CONFIG_DIR, source: str = "sweep") -> Sweep:
    errors: list[str] = []
    sweep = build(SweepConfig, data, "sweep", errors)
    if sweep is None and (sweep := _without_bad_fields(data)) is None:
        raise ConfigError(errors, source)
    known = {kind: set(known_names(kind, config_dir)) for kind in ("datasets", "methods")}

    def component(kind: str, name: str, overrides: dict) -> dict | None:
        if name not in known[kind] or (kind == "methods" and name not in METHODS):
            names = sorted(known[kind] & set(METHODS)) if kind == "methods" else sorted(known[kind])
            errors.append(f"sweep.grid.{kind[:-1]}: unknown {kind[:-1]} {name!r} (known: {', '.join(names)})")
            return None
        return deep_merge(read_yaml(config_dir / kind / f"{name}.yaml"), overrides.get(name, {}))

    # Overrides may name datasets/methods outside the grid (so `--set grid.dataset=[...]` can cut a
    # sweep down), but every name must exist: a typo is an error, not a silently ignored block.
    for kind, names in (("datasets", sweep.datasets), ("methods", sweep.methods)):
        for extra in sorted(set(names) - known[kind]):
            errors.append(f"sweep.{kind}.{extra}: override for an unknown {kind[:-1]}")
    for key in sorted(sweep.train_overrides):
        dname, slash, mname = key.rpartition("/")
        if not (key in known["methods"] or key in known["datasets"]
                or (slash and dname in known["datasets"] and mname in known["methods"])):
            errors.append(f"sweep.train_overrides.{key}: not a known method, dataset or dataset/method")

    datasets = {n: component("datasets", n, sweep.datasets) for n in sweep.grid.dataset}
    methods = {n: component("methods", n, sweep.methods) for n in sweep.grid.method}
    trains: dict[tuple[str, str], TrainConfig | None] = {}
    built: dict[str, TrainConfig | None] = {}  # each distinct merged train block is built (and reported) once
    for dname, mname in itertools.product(sweep.grid.dataset, sweep.grid.method):
        merged = trial_train(sweep, dname, mname)
        key = yaml.safe_dump(merged, sort_keys=True)
        if key not in built:
            where = "sweep.train" if merged == sweep.train else f"sweep.train+overrides({dname}/{mname})"
            built[key] = _train_block(merged, where, errors)
        trains[dname, mname] = built[key]
    evaluation = build(EvalConfig, sweep.eval, "sweep.eval", errors)

    typed_datasets = {n: build(DatasetConfig, d, f"datasets/{n}.yaml", errors)
                      for n, d in datasets.items() if d is not None}
    typed_methods: dict[str, MethodConfig] = {}
    for n, m in methods.items():
        if m is None:
            continue
        mc = build(MethodConfig, m, f"methods/{n}.yaml", errors)
        params = build(METHODS[n].Params, m.get("params") or {}, f"methods/{n}.yaml.params", errors)
        if mc is not None and params is not None:
            typed_methods[n] = mc.model_copy(update={"params": params.to_dict()})
    for (dname, mname), train in trains.items():  # what a method's params require of the training setup
        if train is not None and mname in typed_methods:
            errors += [f"methods/{mname}.yaml.params with the train block of {dname}/{mname}: {p}" for p in
                       METHODS[mname].config_problems(typed_methods[mname].params, train.sync_bn,
                                                      train.batch_per_worker)]
    if errors:
        raise ConfigError(errors, source)

    trials = []
    for dname, mname, seed in itertools.product(sweep.grid.dataset, sweep.grid.method, sweep.grid.seed):
        train = trains[dname, mname]
        common = dict(sweep=sweep.name, seed=seed, dataset=typed_datasets[dname], method=typed_methods[mname],
                      train=train, eval=evaluation)
        if sweep.untrained_reference:
            trials.append(TrialConfig(mixture=MixtureConfig(beta=sweep.mixture_beta),
                                      **(common | {"train": train.model_copy(update={"epochs": 0})})))
        for mtype in sweep.grid.mixture:
            # P only matters when the type is "both"; other types run once.
            for p in sweep.grid.prob if mtype == "both" else sweep.grid.prob[:1]:
                trials.append(TrialConfig(mixture=MixtureConfig(type=mtype, prob=p, beta=sweep.mixture_beta),
                                          **common))
    names = [t.run_name for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError([f"sweep.grid: duplicate trials {dupes}"], source)
    return Sweep(sweep, trials)
