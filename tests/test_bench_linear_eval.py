"""bench/linear_eval.py runs end to end on a few real images and ends with its JSON line."""

from __future__ import annotations

import importlib.util
import json

from .conftest import ROOT


def test_linear_eval_bench_prints_a_json_last_line(capsys, fashion_mnist_root):
    spec = importlib.util.spec_from_file_location("bench_linear_eval", ROOT / "bench" / "linear_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--root", str(fashion_mnist_root), "--threads", "1", "--pretrain-images", "256",
                "--pretrain-epochs", "1", "--pretrain-batch", "64", "--train-images", "320", "--test-images", "200",
                "--linear-epochs", "2", "--paper-epochs", "2"])
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["paper_epochs"] == 2 and figures["train_images"] == 320 and figures["test_images"] == 200
    assert figures["time_ratio"] > 0 and 0 <= figures["fast_top1"] <= 100
    assert abs(figures["top1_diff"] - (figures["fast_top1"] - figures["paper_top1_last"])) <= 0.011
    assert figures["paper_top1_best"] >= figures["paper_top1_last"]
