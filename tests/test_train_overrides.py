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


# ---------------------------------------------------------------- per-cell method and dataset overrides


def two_datasets(tmp_path):
    """configs/ with a second dataset, ``other``, a copy of fashion_mnist under its own name."""
    config_dir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, config_dir)
    text = (config_dir / "datasets" / "fashion_mnist.yaml").read_text()
    (config_dir / "datasets" / "other.yaml").write_text(text.replace("name: fashion_mnist", "name: other"))
    return config_dir


def cells(sweep):
    return {(t.dataset.name, t.method.name): t for t in sweep.trials if t.variant != "untrained"}


def grid2(**extra):
    return sweep_dict(grid={"dataset": ["fashion_mnist", "other"], "method": ["simclr", "byol"],
                            "mixture": ["none"], "seed": [0]}) | extra


def test_method_overrides_merge_method_then_dataset_then_pair(tmp_path):
    config_dir = two_datasets(tmp_path)
    sweep = compose_sweep(grid2(methods={
        "simclr": {"params": {"temperature": 0.3, "proj_hidden": 100}},
        "other": {"params": {"proj_hidden": 200, "proj_dim": 32}},  # every method on `other`
        "other/simclr": {"params": {"temperature": 0.2}, "optim": {"lr": 1.0e-3}},
    }), config_dir)
    c = cells(sweep)
    p = {k: t.method.params for k, t in c.items()}
    assert (p["fashion_mnist", "simclr"]["temperature"], p["fashion_mnist", "simclr"]["proj_hidden"]) == (0.3, 100)
    assert p["fashion_mnist", "simclr"]["proj_dim"] == 64  # configs/methods/simclr.yaml
    assert (p["other", "simclr"]["temperature"], p["other", "simclr"]["proj_hidden"]) == (0.2, 200)
    assert p["other", "simclr"]["proj_dim"] == 32
    assert c["other", "simclr"].method.optim.lr == 1.0e-3 and c["fashion_mnist", "simclr"].method.optim.lr == 3.0e-3
    assert (p["other", "byol"]["proj_hidden"], p["other", "byol"]["proj_dim"]) == (200, 32)
    assert (p["fashion_mnist", "byol"]["proj_hidden"], p["fashion_mnist", "byol"]["proj_dim"]) == (1024, 64)
    # The untrained reference of a cell is built from the same cell's configs.
    untrained = {(t.dataset.name, t.method.name): t for t in sweep.trials if t.variant == "untrained"}
    assert untrained["other", "simclr"].method == c["other", "simclr"].method


def test_dataset_overrides_merge_dataset_then_method_then_pair(tmp_path):
    config_dir = two_datasets(tmp_path)
    sweep = compose_sweep(grid2(datasets={
        "fashion_mnist": {"train_subset": 1000, "augment": {"flip_p": 0.1}},
        "simclr": {"augment": {"flip_p": 0.2, "gray_p": 0.1}},  # every dataset under simclr
        "fashion_mnist/simclr": {"augment": {"flip_p": 0.3, "crop_scale": [0.08, 1.0]}},
    }), config_dir)
    a = {k: t.dataset.augment for k, t in cells(sweep).items()}
    assert (a["fashion_mnist", "simclr"].flip_p, a["fashion_mnist", "simclr"].crop_scale) == (0.3, (0.08, 1.0))
    assert a["fashion_mnist", "simclr"].gray_p == 0.1
    assert (a["fashion_mnist", "byol"].flip_p, a["fashion_mnist", "byol"].crop_scale) == (0.1, (0.2, 1.0))
    assert (a["other", "simclr"].flip_p, a["other", "simclr"].gray_p) == (0.2, 0.1)
    assert (a["other", "byol"].flip_p, a["other", "byol"].gray_p) == (0.5, 0.0)  # configs/datasets/ as is
    subsets = {k: t.dataset.train_subset for k, t in cells(sweep).items()}
    assert subsets == {("fashion_mnist", "simclr"): 1000, ("fashion_mnist", "byol"): 1000,
                       ("other", "simclr"): None, ("other", "byol"): None}


def test_unknown_override_keys_are_errors_naming_the_key(tmp_path):
    config_dir = two_datasets(tmp_path)
    with pytest.raises(ConfigError) as err:
        compose_sweep(grid2(
            methods={"nosuch": {}, "other/nosuch": {}, "nosuch/simclr": {}, "simclr/other": {}, "byol": {}},
            datasets={"typo": {}, "typo/simclr": {}, "other/byol": {}, "simclr": {}},
        ), config_dir)
    problems = err.value.problems
    for key in ("nosuch", "other/nosuch", "nosuch/simclr", "simclr/other"):
        assert sum(p.startswith(f"sweep.methods.{key}: override for an unknown method") for p in problems) == 1, key
    for key in ("typo", "typo/simclr"):
        assert sum(p.startswith(f"sweep.datasets.{key}: override for an unknown dataset") for p in problems) == 1
    assert len(problems) == 6, problems


def test_a_bad_value_in_a_cell_override_names_the_cell(tmp_path):
    config_dir = two_datasets(tmp_path)
    with pytest.raises(ConfigError) as err:
        compose_sweep(grid2(methods={"other/simclr": {"params": {"temprature": 0.1}}},
                            datasets={"byol": {"augment": {"gray_p": 2}}}), config_dir)
    problems = err.value.problems
    assert "methods/simclr.yaml+overrides(other/simclr).params.temprature: unknown key" in " ".join(problems)
    gray = [p for p in problems if "gray_p" in p]
    assert len(gray) == 2 and {p.split(".augment")[0] for p in gray} == {
        "datasets/fashion_mnist.yaml+overrides(fashion_mnist/byol)", "datasets/other.yaml+overrides(other/byol)"}
