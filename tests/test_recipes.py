"""The paper sweep runs the recipes docs/recipes.md states: every trial of configs/sweeps/paper.yaml has
exactly the values of its (dataset, method) table, and every hyper-parameter it has is in that table.
Also the recipe-specific backbones and how the plan prices symmetric MoCo."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
import yaml

from unmix_ray.compose import load_sweep
from unmix_ray.config import CONFIG_DIR, Sweep
from unmix_ray.models import build_backbone
from unmix_ray.orchestration.plan import estimate_trial
from unmix_ray.orchestration.throughput import load_throughput

from .conftest import ROOT

DOC = ROOT / "docs" / "recipes.md"
TRAIN_KEYS = ("backbone", "epochs", "batch_size", "num_workers", "precision")


def parse_value(text: str) -> Any:
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_tables(text: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``### dataset / method`` headings, each followed by ``| `parameter` | `value` | source |`` rows."""
    tables: dict[tuple[str, str], dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        heading = re.fullmatch(r"### (\w+) / (\w+)\s*", line)
        if heading:
            assert (heading[1], heading[2]) not in tables, f"two tables for {heading[1]} / {heading[2]}"
            current = tables[heading[1], heading[2]] = {}
        elif line.startswith("#"):
            current = None
        elif current is not None and line.startswith("| `"):
            name, value = (c.strip().strip("`") for c in line.strip().strip("|").split("|")[:2])
            assert name not in current, f"{name} listed twice"
            current[name] = parse_value(value)
    return tables


def required(trial: dict[str, Any]) -> set[str]:
    """Every hyper-parameter of a trial that its table must list (optimiser settings that the chosen
    optimiser or schedule ignores are left out)."""
    optim = trial["method"]["optim"]
    ignored = {"momentum"} if optim["name"] == "adam" else set()
    ignored |= {"final_lr"} if optim["schedule"] == "step" else {"milestones", "gamma"}
    return ({f"train.{k}" for k in TRAIN_KEYS} | {"mixture.beta", "dataset.crop_size", "dataset.pretrain_splits"}
            | {f"dataset.augment.{k}" for k in trial["dataset"]["augment"]}
            | {f"method.params.{k}" for k in trial["method"]["params"]}
            | {f"method.optim.{k}" for k in optim if k not in ignored})


def lookup(tree: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            raise KeyError(path)
        tree = tree[part]
    return tree


def same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool) or expected is None or actual is None:
        return expected is actual
    if isinstance(expected, (int, float)) and isinstance(actual, (int, float)):
        return actual == pytest.approx(expected, rel=1e-9, abs=0)
    if isinstance(expected, list) and isinstance(actual, list):
        return len(expected) == len(actual) and all(same(e, a) for e, a in zip(expected, actual, strict=True))
    return expected == actual


def problems(sweep: Sweep, tables: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Every difference between the sweep's trials and the tables, as readable lines."""
    out = []
    cells = {(t.dataset.name, t.method.name) for t in sweep.trials}
    out += [f"no table for {d} / {m}" for d, m in sorted(cells - set(tables))]
    out += [f"a table for {d} / {m}, which the sweep does not run" for d, m in sorted(set(tables) - cells)]
    for trial in sweep.trials:
        cell = (trial.dataset.name, trial.method.name)
        if cell not in tables:
            continue
        table, data = tables[cell], trial.to_dict()
        where = f"{cell[0]} / {cell[1]} ({trial.run_name})"
        need = required(data)
        out += [f"{where}: {p} = {lookup(data, p)!r} is not in the table" for p in sorted(need - set(table))]
        out += [f"{where}: the table lists {p}, not a hyper-parameter of the trial" for p in sorted(set(table) - need)]
        for path in sorted(need & set(table)):
            if path == "train.epochs" and trial.variant == "untrained":
                continue  # the untrained reference of the cell: no pretraining
            if not same(table[path], lookup(data, path)):
                out.append(f"{where}: {path} is {lookup(data, path)!r}, the table says {table[path]!r}")
    return out


PAPER_SWEEP = CONFIG_DIR / "sweeps" / "paper.yaml"


@pytest.fixture(scope="module")
def paper() -> Sweep:
    return load_sweep(PAPER_SWEEP)


@pytest.fixture(scope="module")
def tables() -> dict[tuple[str, str], dict[str, Any]]:
    return parse_tables(DOC.read_text())


def test_every_trial_runs_the_recipe_of_its_table(paper, tables):
    assert len(tables) == 25
    found = problems(paper, tables)
    assert not found, "\n".join(found[:40])


def test_a_change_on_either_side_is_caught(paper, tables):
    """The comparison is not vacuous: a changed value in the sweep or in a table, a row missing from
    a table, a row too many, and a hyper-parameter the tables do not know all fail it."""
    changed_sweep = load_sweep(PAPER_SWEEP, ["methods.moco_v1.optim.lr=0.07"])
    assert any("method.optim.lr is 0.07" in p and "cifar10 / moco_v1" in p for p in problems(changed_sweep, tables))
    changed_cell = load_sweep(PAPER_SWEEP, ["datasets.imagenet/swav.augment.blur_p=0.2"])
    assert [p for p in problems(changed_cell, tables) if "imagenet / swav" in p and "blur_p" in p]

    edited = {cell: dict(rows) for cell, rows in tables.items()}
    edited["stl10", "byol"]["method.optim.warmup_iters"] = 499
    del edited["cifar100", "swav"]["method.params.freeze_prototypes_iters"]
    edited["imagenet", "moco_v2"]["method.optim.milestones"] = [120, 160]  # ignored by a cosine schedule
    found = problems(paper, edited)
    assert any("stl10 / byol" in p and "warmup_iters is 500, the table says 499" in p for p in found)
    assert any("cifar100 / swav" in p and "freeze_prototypes_iters = 5005 is not in the table" in p for p in found)
    assert any("imagenet / moco_v2" in p and "lists method.optim.milestones" in p for p in found)

    unknown = paper.trials[1].model_copy(deep=True)
    unknown.method.params["new_knob"] = 1
    assert any("new_knob" in p for p in problems(Sweep(paper.config, [unknown]), tables))
    assert problems(Sweep(paper.config, paper.trials[:5]), tables)  # tables for cells it does not run


def test_the_tables_read_back_what_they_say():
    text = ("## x\n\n### cifar10 / simclr\n\n| parameter | value | source |\n|---|---|---|\n"
            "| `method.optim.weight_decay` | `1e-6` | a |\n| `method.params.proj_hidden` | `null` | b |\n"
            "| `dataset.augment.crop_scale` | `[0.08, 1.0]` | c |\n| `method.params.symmetric` | `true` | d |\n"
            "| `train.backbone` | `resnet18_cifar` | e |\n\n## Departures\n\n| `not.a.row` | `1` | x |\n")
    assert parse_tables(text) == {("cifar10", "simclr"): {
        "method.optim.weight_decay": 1e-6, "method.params.proj_hidden": None,
        "dataset.augment.crop_scale": [0.08, 1.0], "method.params.symmetric": True,
        "train.backbone": "resnet18_cifar"}}
    assert not same(1.0, True) and not same(None, 0) and same([0.2, 1], [0.2, 1.0]) and not same(0.1, 0.1000001)


# ---------------------------------------------------------------- the recipes' backbones


def stage_inputs(name: str, size: int) -> tuple[int, int]:
    """The feature dimension of backbone ``name`` and the side of the maps entering its first stage."""
    model = build_backbone(name, 3).eval()
    seen = []
    model.layer1.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    with torch.no_grad():
        out = model(torch.zeros(2, 3, size, size))
    assert out.shape == (2, model.feature_dim)
    return model.feature_dim, seen[0]


def test_recipe_backbones_have_the_authors_shapes():
    assert stage_inputs("resnet18_cifar", 32) == (512, 32)  # no max-pool
    assert stage_inputs("resnet18_small_maxpool", 64) == (512, 32)  # stride-1 stem, then the max-pool
    assert stage_inputs("resnet18_bottleneck_cifar", 32) == (2048, 34)  # 1-pixel pad, no max-pool
    bottleneck = build_backbone("resnet18_bottleneck_cifar", 3)
    assert [len(getattr(bottleneck, f"layer{i}")) for i in range(1, 5)] == [2, 2, 2, 2]
    assert type(bottleneck.layer1[0]).__name__ == "Bottleneck"
    assert build_backbone("resnet18_small_maxpool", 1).conv1.kernel_size == (3, 3)


# ---------------------------------------------------------------- the plan prices what the recipes run


def test_the_plan_prices_symmetric_moco_as_two_passes(paper):
    table = load_throughput()
    trial = next(t for t in paper.trials if t.run_name == "moco_v1-cifar10-mixup-p0.5-s0")
    rate = table.rate("cifar10", trial.train.backbone, "moco_v1")

    def hours(symmetric: bool, mixture: str, form: str = "view0") -> float:
        params = trial.method.params | {"symmetric": symmetric, "symmetric_mix": form}
        t = trial.model_copy(update={"method": trial.method.model_copy(update={"params": params}),
                                     "mixture": trial.mixture.model_copy(update={"type": mixture})})
        return estimate_trial(t, table).pretrain_gpu_hours

    base = hours(False, "none")
    extra = rate.unmix_factor - 1  # the mixed query's forward and backward, per base step
    assert hours(False, "mixup") == pytest.approx(base * (1 + extra))
    assert hours(True, "none") == pytest.approx(2 * base)
    assert hours(True, "mixup") == pytest.approx(base * (2 + extra))  # one mixed pass serves both halves
    assert hours(True, "mixup", "both_views") == pytest.approx(base * (2 + 2 * extra))
