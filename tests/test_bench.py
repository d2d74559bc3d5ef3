"""The step-overhead benchmark runs and ends with its JSON line (tiny batch, one step, two methods)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

torch.set_num_threads(1)
SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "step_overhead.py"


def test_step_overhead_prints_a_json_last_line(capsys):
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--methods", "simclr", "moco_v1", "--batch", "2", "--steps", "1", "--warmup", "0"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    figures = json.loads(last)
    assert set(figures) == {"simclr", "moco_v1"}
    assert figures["simclr"]["floor"] == 1.5 and figures["moco_v1"]["floor"] == 1.75
    assert all(f["ratio"] > 0 for f in figures.values())
