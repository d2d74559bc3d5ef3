"""bench/gpu.py runs its whole code path on the CPU at tiny sizes, without Ray, MLflow, pandas, pyarrow,
boto3, scipy or matplotlib, and reports every figure the GPU check promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from unmix_ray.config import build
from unmix_ray.orchestration.throughput import THROUGHPUT_PATH, ThroughputGroup, ThroughputTable, load_throughput

from .conftest import ROOT

METHODS = ["simclr", "byol", "moco_v1", "moco_v2", "swav"]
FLOORS = {"simclr": 1.5, "byol": 1.5, "moco_v1": 1.75, "moco_v2": 1.75, "swav": 1.5}
ABSENT = ("ray", "mlflow", "pyarrow", "pandas", "boto3", "botocore", "scipy", "matplotlib")
# The machine the check is written for has torch, torchvision, numpy, pyyaml (and pydantic, carried as
# wheels): the script must run with every other package of the project unimportable.
RUNNER = (f"import runpy, sys; sys.modules.update({{m: None for m in {ABSENT!r}}}); "
          "sys.argv = ['bench/gpu.py', *sys.argv[1:]]; runpy.run_path('bench/gpu.py', run_name='__main__')")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, fashion_mnist_root) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("gpu") / "cpu.json"
    proc = subprocess.run([sys.executable, "-c", RUNNER, "--device", "cpu", "--smoke", "--threads", "1",
                           "--fashion-mnist", str(fashion_mnist_root), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    return printed, json.loads(out.read_text())


def test_the_last_line_is_the_json_written_to_out(smoke):
    printed, written = smoke
    assert printed == written
    assert printed["complete"] and printed["smoke"] and printed["errors"] == {}
    assert printed["kind"] == "cpu" and printed["peak_tflops_bf16"] == 790.0
    assert printed["command"].startswith("python bench/gpu.py --device cpu --smoke")


def test_every_method_with_and_without_unmix_in_every_mode(smoke):
    result, _ = smoke
    peak = result["peak_tflops_bf16"]
    assert set(result["train_step"]) == set(METHODS)
    for name, cell in result["train_step"].items():
        assert cell["floor"] == FLOORS[name] and cell["batch"] == 16
        for variant in ("none", "unmix"):
            entry = cell[variant]
            flops = entry["flops_per_step"]
            assert flops > 0
            for mode in ("eager", "fp32_eager"):
                m = entry[mode]
                assert m["images_per_s"] == pytest.approx(16 / (m["step_ms"] / 1e3), rel=1e-2)
                assert m["tflops_per_s"] == pytest.approx(flops / (m["step_ms"] / 1e3) / 1e12, rel=1e-3)
                assert m["steps_timed"] >= 1 and "peak_memory_gib" in m
            assert entry["eager"]["fraction_of_peak"] == pytest.approx(entry["eager"]["tflops_per_s"] / peak,
                                                                       rel=1e-3)
            assert "fraction_of_peak" not in entry["fp32_eager"]  # the peak given is bf16's
            assert "--smoke" in entry["compile"]["skipped"]  # not run in smoke mode, and says why
        for mode in ("eager", "fp32_eager"):
            assert cell["ratio"][mode] == pytest.approx(cell["unmix"][mode]["step_ms"] / cell["none"][mode]["step_ms"],
                                                        rel=1e-2)
            assert cell["ratio_vs_floor"][mode] == pytest.approx(cell["ratio"][mode] / cell["floor"], rel=1e-2)


def test_the_flop_counts_confirm_the_floors(smoke):
    """One mixture pass on top of two views: the counted FLOPs grow by the floor's factor (SimCLR, BYOL,
    SwAV); MoCo's extra InfoNCE terms against the queue only add to its 7/4."""
    cells = smoke[0]["train_step"]
    for name in ("simclr", "byol", "swav"):
        assert cells[name]["flop_ratio"] == pytest.approx(FLOORS[name], abs=0.02), name
    for name in ("moco_v1", "moco_v2"):
        assert cells[name]["flop_ratio"] >= FLOORS[name] - 0.02, name


def test_resnet50_augment_and_evaluation_figures(smoke):
    result, _ = smoke
    r50 = result["resnet50_moco_v2"]
    assert r50["recipe_batch_per_gpu"] == 32  # 256 over 8 GPUs
    cell = r50["batch_2"]
    assert cell["floor"] == 1.75 and cell["unmix"]["flops_per_step"] > cell["none"]["flops_per_step"]
    for variant in ("none", "unmix"):
        for mode in ("eager", "fp32_eager"):
            m = cell[variant][mode]
            assert m["gpu_hours_per_run"] == pytest.approx(1_281_167 * 200 / m["images_per_s"] / 3600, rel=2e-2)
    for recipe in ("cifar10", "imagenet"):
        assert result["augment"][recipe]["views_per_s"] > 0
    ev = result["evaluation"]
    assert ev["extract_images_per_s"] > 0
    assert ev["knn"]["bank"] == 256 and ev["knn"]["k"] == 200 and ev["knn"]["seconds"] > 0
    assert ev["linear_probe"]["epochs"] == 2 and ev["linear_probe"]["seconds_per_epoch"] > 0
    assert ev["knn_imagenet"]["dim"] == 64 and ev["knn_imagenet"]["chunk"] == (1 << 30) // (4096 * 4)


def test_fashion_mnist_training_and_its_checks(smoke):
    result, _ = smoke
    fm = result["fashion_mnist"]
    assert fm["train_images"] == 64 and fm["test_images"] == 64 and fm["epochs"] == 1
    assert 0 <= fm["knn_top1_untrained"] <= 100 and 0 <= fm["knn_top1_pretrained"] <= 100
    cmp = fm["bf16_vs_fp32"]
    assert len(cmp["fp32_loss"]) == len(cmp["bf16_loss"]) == cmp["steps"] == 2
    assert cmp["max_rel_diff"] == pytest.approx(
        max(abs(b - f) / abs(f) for f, b in zip(cmp["fp32_loss"], cmp["bf16_loss"])), abs=1e-4)
    checks = result["checks"]
    assert set(checks) == {"pretrained_beats_untrained_knn", "bf16_matches_fp32"}
    assert checks["bf16_matches_fp32"]["ok"] == (cmp["max_rel_diff"] <= cmp["tolerance"])
    assert result["ok"] == all(c["ok"] for c in checks.values())


def test_the_throughput_entry_is_a_table_group_the_plan_prefers(smoke):
    result, _ = smoke
    groups = result["throughput_entry"]
    assert [g["backbone"] for g in groups] == ["resnet18_cifar", "resnet50"]
    assert groups[0]["samples_per_s"] == {m: result["train_step"][m]["none"]["fp32_eager"]["images_per_s"]
                                          for m in METHODS}
    assert all(g["measured"] and g["command"] == result["command"] for g in groups)
    raw = load_throughput(THROUGHPUT_PATH).model_dump()
    raw["sources"]["run"] = "the smoke run"
    raw["throughput"] += [g | {"gpu": "h200", "source": ["run"]} for g in groups]
    table = build(ThroughputTable, raw, "with the smoke run's figures")
    rate = table.rate("cifar10", "resnet18_cifar", "moco_v2", "h200")
    assert rate.measured and rate.command == result["command"]
    assert rate.samples_per_s == groups[0]["samples_per_s"]["moco_v2"]
    build(ThroughputGroup, groups[1] | {"source": ["run"]}, "group")


def test_tf32_is_off_inside_the_fp32_reference_and_restored_after(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.syspath_prepend(str(ROOT))
    import torch
    from gpu_fashion_mnist import no_tf32

    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with no_tf32():
        if hasattr(torch.backends.cudnn.conv, "fp32_precision"):
            assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "ieee"
        else:
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before  # readable again
