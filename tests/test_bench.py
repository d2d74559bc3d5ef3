"""The step-overhead benchmark runs and ends with its JSON line (tiny batch, one step, two methods), and
the Un-Mix cost floors it prints (and configs/throughput.yaml plans with) are the ones the methods'
definitions imply."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from unmix_ray.orchestration.throughput import load_throughput

torch.set_num_threads(1)
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "step_overhead.py"

# Backbone work per sample in units of one forward pass, a backward counting as two (a trained pass is
# 3, a no-grad forward 1), read from each method's definition (shared/UNMIX.md, "The loss"):
# (trained passes, no-grad forwards) of the base step, and what the one mixture adds.
TRAINED, FORWARD = 3, 1
PASSES = {
    "simclr": ((2, 0), (1, 0)),  # both views trained; the mixture one more trained pass
    "byol": ((2, 2), (1, 1)),  # online on both views, target on both; the mixture through both branches
    "moco_v1": ((1, 1), (1, 0)),  # asymmetric: query of view 0 trained, key of view 1; a mixed query
    "moco_v2": ((1, 1), (1, 0)),
    "swav": ((2, 0), (1, 0)),  # both views trained (codes come from the same pass); the mixture trained
}


def units(passes: tuple[int, int]) -> int:
    trained, forward = passes
    return trained * TRAINED + forward * FORWARD


def floor(method: str) -> float:
    """Un-Mix step work over the base step's: (base units + the mixture's units) / base units."""
    base, mixture = PASSES[method]
    return (units(base) + units(mixture)) / units(base)


def load_bench():
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_floors_from_the_definitions():
    assert floor("simclr") == (6 + 3) / 6 == 1.5
    assert floor("moco_v1") == (4 + 3) / 4 == 1.75
    assert floor("byol") == (8 + 4) / 8


def test_benchmark_and_throughput_table_use_the_defined_floors():
    assert load_bench().FLOORS == {name: floor(name) for name in PASSES}
    costs = {m.name: m for m in load_throughput().methods}
    assert set(costs) == set(PASSES)
    for name, (base, mixture) in PASSES.items():
        assert (costs[name].step_units, costs[name].unmix_extra_units) == (units(base), units(mixture)), name
        assert costs[name].unmix_factor == pytest.approx(floor(name))


def test_step_overhead_prints_a_json_last_line(capsys):
    load_bench().main(["--methods", "simclr", "moco_v1", "--batch", "2", "--steps", "1", "--warmup", "0"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert set(figures) == {"simclr", "moco_v1"}
    assert {name: f["floor"] for name, f in figures.items()} == {"simclr": floor("simclr"), "moco_v1": floor("moco_v1")}
    assert all(f["ratio"] > 0 for f in figures.values())
