"""Compose a sweep YAML with ``configs/{datasets,methods}/`` into one typed TrialConfig per trial.

A sweep file names datasets and methods; each name is read from ``configs/datasets/<name>.yaml`` or
``configs/methods/<name>.yaml`` and the sweep's overrides are merged on top, per (dataset, method)
cell, so that each cell can carry its own published recipe. The sweep's ``train_overrides``,
``methods`` and ``datasets`` blocks take the same keys: a method name, a dataset name or
"dataset/method". Each block merges its own kind's name first, then the other kind's, then the pair
(the most specific wins): ``methods``: method, dataset ("every method on that dataset"), pair;
``datasets``: dataset, method ("every dataset under that method"), pair; ``train_overrides``:
method, dataset, pair. Everything is validated here, against the method, backbone and dataset-loader
registries, before Ray is touched, and every problem is reported at once.
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


def _cell(base: dict[str, Any], block: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    out = dict(base)
    for key in keys:
        out = deep_merge(out, block.get(key, {}))
    return out


def trial_train(sweep: SweepConfig, dataset: str, method: str) -> dict[str, Any]:
    """The ``train`` mapping of one (dataset, method) cell: ``sweep.train`` with the
    ``train_overrides`` of the method, then of the dataset, then of "dataset/method" merged on top."""
    return _cell(sweep.train, sweep.train_overrides, (method, dataset, f"{dataset}/{method}"))


def trial_method(sweep: SweepConfig, dataset: str, method: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The method mapping of one cell: ``configs/methods/<method>.yaml`` with the sweep's ``methods``
    entries for the method, then the dataset, then "dataset/method" merged on top."""
    return _cell(read_yaml(config_dir / "methods" / f"{method}.yaml"), sweep.methods,
                 (method, dataset, f"{dataset}/{method}"))


def trial_dataset(sweep: SweepConfig, dataset: str, method: str, config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The dataset mapping of one cell: ``configs/datasets/<dataset>.yaml`` with the sweep's ``datasets``
    entries for the dataset, then the method, then "dataset/method" merged on top."""
    return _cell(read_yaml(config_dir / "datasets" / f"{dataset}.yaml"), sweep.datasets,
                 (dataset, method, f"{dataset}/{method}"))


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


def _unknown_keys(block: dict[str, Any], known: dict[str, set[str]]) -> list[str]:
    """Keys of an override block that are not a known method, dataset or "dataset/method"."""
    out = []
    for key in sorted(block):
        dname, slash, mname = key.rpartition("/")
        if not (key in known["methods"] or key in known["datasets"]
                or (slash and dname in known["datasets"] and mname in known["methods"])):
            out.append(key)
    return out


def compose_sweep(data: dict[str, Any], config_dir: Path = CONFIG_DIR, source: str = "sweep") -> Sweep:
    errors: list[str] = []
    sweep = build(SweepConfig, data, "sweep", errors)
    if sweep is None and (sweep := _without_bad_fields(data)) is None:
        raise ConfigError(errors, source)
    known = {kind: set(known_names(kind, config_dir)) for kind in ("datasets", "methods")}

    def exists(kind: str, name: str) -> bool:
        if name in known[kind] and (kind == "datasets" or name in METHODS):
            return True
        names = sorted(known[kind] & set(METHODS)) if kind == "methods" else sorted(known[kind])
        errors.append(f"sweep.grid.{kind[:-1]}: unknown {kind[:-1]} {name!r} (known: {', '.join(names)})")
        return False

    # Overrides may name datasets/methods outside the grid (so `--set grid.dataset=[...]` can cut a
    # sweep down), but every key must exist: a typo is an error, not a silently ignored block.
    for kind, other in (("datasets", "method"), ("methods", "dataset")):
        for key in _unknown_keys(getattr(sweep, kind), known):
            errors.append(f"sweep.{kind}.{key}: override for an unknown {kind[:-1]} (keys: a {kind[:-1]}, "
                          f"a {other} or dataset/method)")
    for key in _unknown_keys(sweep.train_overrides, known):
        errors.append(f"sweep.train_overrides.{key}: not a known method, dataset or dataset/method")

    dnames = [n for n in sweep.grid.dataset if exists("datasets", n)]
    mnames = [n for n in sweep.grid.method if exists("methods", n)]
    # Each distinct merged block is built (and its problems reported) once, named by the file alone
    # when no cell-specific override touches it.
    built: dict[tuple[str, str], Any] = {}

    def once(kind: str, merged: dict[str, Any], where: str, make: Any) -> Any:
        key = (kind, yaml.safe_dump(merged, sort_keys=True))
        if key not in built:
            built[key] = make(merged, where)
        return built[key]

    def make_method(merged: dict[str, Any], where: str, name: str) -> MethodConfig | None:
        mc = build(MethodConfig, merged, where, errors)
        params = build(METHODS[name].Params, merged.get("params") or {}, f"{where}.params", errors)
        return mc.model_copy(update={"params": params.to_dict()}) if mc is not None and params is not None else None

    trains: dict[tuple[str, str], TrainConfig | None] = {}
    for dname, mname in itertools.product(sweep.grid.dataset, sweep.grid.method):  # checked even for bad names
        merged = trial_train(sweep, dname, mname)
        where = "sweep.train" if merged == sweep.train else f"sweep.train+overrides({dname}/{mname})"
        trains[dname, mname] = once("train", merged, where, lambda t, w: _train_block(t, w, errors))
    cells: dict[tuple[str, str], tuple[DatasetConfig | None, MethodConfig | None]] = {}
    for dname, mname in itertools.product(dnames, mnames):
        ds, md = trial_dataset(sweep, dname, mname, config_dir), trial_method(sweep, dname, mname, config_dir)
        plain_d = deep_merge(read_yaml(config_dir / "datasets" / f"{dname}.yaml"), sweep.datasets.get(dname, {}))
        plain_m = deep_merge(read_yaml(config_dir / "methods" / f"{mname}.yaml"), sweep.methods.get(mname, {}))
        cell = f"+overrides({dname}/{mname})"
        cells[dname, mname] = (
            once("dataset", ds, f"datasets/{dname}.yaml" + ("" if ds == plain_d else cell),
                 lambda d, w: build(DatasetConfig, d, w, errors)),
            once("method", md, f"methods/{mname}.yaml" + ("" if md == plain_m else cell),
                 lambda m, w, name=mname: make_method(m, w, name)),
        )
    evaluation = build(EvalConfig, sweep.eval, "sweep.eval", errors)
    for (dname, mname), (_, method) in cells.items():  # what a method's params require of the training setup
        train = trains[dname, mname]
        if train is not None and method is not None:
            errors += [f"methods/{mname}.yaml.params with the train block of {dname}/{mname}: {p}" for p in
                       METHODS[mname].config_problems(method.params, train.sync_bn, train.batch_per_worker)]
    if errors:
        raise ConfigError(errors, source)

    # The untrained references (evaluation only, a fraction of a trained trial) go last: with trials
    # running side by side they fill the end of the sweep instead of leaving a long trial to run alone.
    trials, references = [], []
    for dname, mname, seed in itertools.product(dnames, mnames, sweep.grid.seed):
        (dataset, method), train = cells[dname, mname], trains[dname, mname]
        common = dict(sweep=sweep.name, seed=seed, dataset=dataset, method=method, train=train, eval=evaluation)
        if sweep.untrained_reference and (sweep.untrained_seeds == "all" or seed == sweep.grid.seed[0]):
            references.append(TrialConfig(mixture=MixtureConfig(beta=sweep.mixture_beta),
                                          **(common | {"train": train.model_copy(update={"epochs": 0})})))
        for mtype in sweep.grid.mixture:
            # P only matters when the type is "both"; other types run once.
            for p in sweep.grid.prob if mtype == "both" else sweep.grid.prob[:1]:
                trials.append(TrialConfig(mixture=MixtureConfig(type=mtype, prob=p, beta=sweep.mixture_beta),
                                          **common))
    trials += references
    names = [t.run_name for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError([f"sweep.grid: duplicate trials {dupes}"], source)
    return Sweep(sweep, trials)
