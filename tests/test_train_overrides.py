"""Per-recipe ``train_overrides`` and the drivers' ``tune.trial_resources`` in sweep configs."""

from __future__ import annotations

import shutil

import pytest

from unmix_ray.compose import compose_sweep, trial_train
from unmix_ray.config import CONFIG_DIR, ConfigError, SweepConfig, build


def sweep_dict(**extra):
    return {
        "name": "t",
        "grid": {"dataset": ["fashion_mnist"], "method": ["simclr"], "mixture": ["none", "mixup"],
                 "seed": [0]},
        "train": {"backbone": "resnet_narrow", "epochs": 2, "batch_size": 64},
    } | extra


def test_no_overrides_keeps_the_shared_train_block():
    sweep = compose_sweep(sweep_dict())
    assert {t.train.epochs for t in sweep.trials if t.variant != "untrained"} == {2}


def test_overrides_merge_method_then_dataset_then_pair():
    cfg = build(SweepConfig, sweep_dict(train_overrides={
        "simclr": {"epochs": 3, "batch_size": 128, "num_workers": 2},
        "fashion_mnist": {"epochs": 4, "batch_size": 32},
        "fashion_mnist/simclr": {"epochs": 5},
    }))
    merged = trial_train(cfg, "fashion_mnist", "simclr")
    assert merged == {"backbone": "resnet_narrow", "epochs": 5, "batch_size": 32, "num_workers": 2}

    sweep = compose_sweep(sweep_dict(train_overrides={
        "simclr": {"epochs": 3, "batch_size": 128, "num_workers": 2},
        "fashion_mnist": {"epochs": 4, "batch_size": 32},
    }))
    trained = [t for t in sweep.trials if t.variant != "untrained"]
    assert {(t.train.epochs, t.train.batch_size, t.train.num_workers) for t in trained} == {(4, 32, 2)}
    untrained = [t for t in sweep.trials if t.variant == "untrained"]
    assert len(untrained) == 1 and untrained[0].train.epochs == 0 and untrained[0].train.num_workers == 2


def test_override_errors_are_reported_once_per_distinct_block():
    with pytest.raises(ConfigError) as err:
        compose_sweep(sweep_dict(train_overrides={"simclr": {"batch_size": 63}, "nosuch": {"epochs": 1},
                                                  "fashion_mnist/nosuch": {"epochs": 1}}))
    problems = err.value.problems
    assert any("train_overrides.nosuch:" in p for p in problems)
    assert any("train_overrides.fashion_mnist/nosuch:" in p for p in problems)
    assert sum("batch_size" in p for p in problems) == 1


def test_override_for_a_known_name_outside_the_grid_is_allowed(tmp_path):
    config_dir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, config_dir)
    text = (config_dir / "datasets" / "fashion_mnist.yaml").read_text()
    (config_dir / "datasets" / "other.yaml").write_text(text.replace("name: fashion_mnist", "name: other"))
    data = sweep_dict(train_overrides={"other": {"epochs": 9}}, datasets={"other": {"root": "/x"}})
    sweep = compose_sweep(data, config_dir)
    assert all(t.train.epochs in (0, 2) for t in sweep.trials)
    with pytest.raises(ConfigError, match="override for an unknown dataset"):
        compose_sweep(sweep_dict(datasets={"typo": {"root": "/x"}}), config_dir)


def test_trial_resources_are_validated():
    sweep = compose_sweep(sweep_dict(tune={"trial_resources": {"trial_driver": 1}}))
    assert sweep.config.tune.trial_resources == {"trial_driver": 1}
    with pytest.raises(ConfigError, match="trial_resources.trial_driver"):
        compose_sweep(sweep_dict(tune={"trial_resources": {"trial_driver": -1}}))
