"""Sweep configs are composed from configs/ and validated at the edge, naming every problem."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from unmix_ray.compose import load_sweep
from unmix_ray.config import ConfigError, apply_overrides

from .conftest import ROOT

DEMO = ROOT / "configs/sweeps/demo.yaml"


def test_demo_sweep_composes_baseline_and_unmix_over_three_seeds_and_the_untrained_reference():
    sweep = load_sweep(DEMO)
    names = [t.run_name for t in sweep.trials]
    assert names == [
        "simclr-fashion_mnist-none-p0.5-s0", "simclr-fashion_mnist-both-p0.5-s0",
        "simclr-fashion_mnist-none-p0.5-s1", "simclr-fashion_mnist-both-p0.5-s1",
        "simclr-fashion_mnist-none-p0.5-s2", "simclr-fashion_mnist-both-p0.5-s2",
        "simclr-fashion_mnist-resnet_narrow-untrained-s0",  # last: the short trial fills the sweep's end
    ]
    t = sweep.trials[-2]
    assert t.method.params["temperature"] == 0.5 and t.dataset.crop_size == 28
    assert t.dataset.train_subset == 8192  # the sweep's per-dataset override merged over the dataset YAML
    assert sweep.trials[-1].train.epochs == 0 and sweep.trials[-1].variant == "untrained"


def test_overrides_and_grid_over_probabilities():
    sweep = load_sweep(DEMO, ["grid.mixture=[none, mixup, cutmix, both]", "grid.prob=[0.25, 0.75]",
                              "grid.seed=[0, 1]", "untrained_reference=false", "train.epochs=2"])
    variants = sorted({t.variant for t in sweep.trials})
    assert variants == ["both@0.25", "both@0.75", "cutmix", "mixup", "none"]
    assert len(sweep.trials) == 5 * 2 and all(t.train.epochs == 2 for t in sweep.trials)


def test_trial_config_roundtrips_through_a_plain_dict():
    t = load_sweep(DEMO).trials[-1]
    assert type(t).from_dict(t.to_dict()) == t


def test_every_problem_is_named_at_once():
    bad = ["grid.method=[simclr, nosuchmethod]", "grid.dataset=[fashion_mnist, imagenet22k]",
           "grid.prob=[0.5, 1.5]", "train.batch_size=254", "train.num_workers=2", "train.epochz=3"]
    with pytest.raises(ConfigError) as e:
        load_sweep(DEMO, bad)
    text = str(e.value)
    for fragment in ("'nosuchmethod'", "'imagenet22k'", "prob[1]", "P must be in [0, 1], got 1.5",
                     "per-worker batch 127 is odd", "train.epochz: unknown key"):
        assert fragment in text, fragment
    assert len(e.value.problems) == 5 + 1 - 1  # batch and workers together make one problem


def test_bad_values_inside_component_files(tmp_path):
    for kind in ("datasets", "methods", "sweeps"):
        (tmp_path / kind).mkdir()
    (tmp_path / "datasets/fashion_mnist.yaml").write_text((ROOT / "configs/datasets/fashion_mnist.yaml").read_text())
    method = yaml.safe_load((ROOT / "configs/methods/simclr.yaml").read_text())
    method["params"]["temprature"] = 0.1
    method["optim"]["lr"] = -1
    (tmp_path / "methods/simclr.yaml").write_text(yaml.safe_dump(method))
    with pytest.raises(ConfigError) as e:
        from unmix_ray.compose import compose_sweep
        compose_sweep(yaml.safe_load(DEMO.read_text()), config_dir=tmp_path)
    assert "methods/simclr.yaml.params.temprature: unknown key" in str(e.value)
    assert "methods/simclr.yaml.optim.lr: must be > 0" in str(e.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError):
        apply_overrides({}, ["no_equals_sign"])
    assert apply_overrides({"a": {"b": 1}}, ["a.b=[1, 2]", "a.c=x"]) == {"a": {"b": [1, 2], "c": "x"}}


def test_cli_rejects_an_invalid_config_before_ray_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "jobs/sweep.py"), "--config", str(DEMO), "--set", "grid.method=[simclr,foo]",
         "--set", "grid.prob=[-0.1]", "--set", "train.batch_size=3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    for fragment in ("unknown method 'foo'", "got -0.1", "per-worker batch 3 is odd"):
        assert fragment in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr.replace("configs", "")  # no Ray instance was started
    assert not (tmp_path / "mlflow.db").exists()
