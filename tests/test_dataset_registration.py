"""Adding a dataset: a YAML naming a loader module (inside the package or not), or a YAML alone for data
in the ``.npz`` format; what a loader returns is checked against the config when it is loaded."""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from unmix_ray.compose import load_sweep
from unmix_ray.config import CONFIG_DIR, ConfigError, DatasetConfig, build
from unmix_ray.data import DatasetError, ImageSet, load_split
from unmix_ray.data.npz import stratified_split

from .conftest import ROOT


def dataset_yaml(name: str, root: Path, **extra) -> dict:
    return {"name": name, "root": str(root), "num_classes": 4, "channels": 3, "image_size": 16, "crop_size": 16,
            "mean": [0.5] * 3, "std": [0.25] * 3, "augment": {"crop_scale": [0.3, 1.0]}} | extra


def write_npz_dataset(root: Path, n: int = 400) -> None:
    """One ``all.npz`` of 16x16 RGB images, channels last: 4 classes of brightness bands."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    base = (40 + 60 * labels)[:, None, None, None]
    images = np.clip(base + rng.normal(0, 12, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "all.npz", images=images, labels=labels)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """configs/ plus two new datasets: ``stripes`` (a loader module outside the package) and ``bands``
    (a YAML only, .npz files, split by a seeded stratified draw)."""
    out = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, out)
    (tmp_path / "stripes").mkdir()
    (tmp_path / "stripes" / "seed.txt").write_text("7\n")
    write_npz_dataset(tmp_path / "bands")
    (out / "datasets" / "stripes.yaml").write_text(yaml.safe_dump(
        dataset_yaml("stripes", tmp_path / "stripes", loader="tests.outside.stripes")))
    (out / "datasets" / "bands.yaml").write_text(yaml.safe_dump(dataset_yaml(
        "bands", tmp_path / "bands", loader="unmix_ray.data.npz",
        loader_options={"split_from": "all", "test_fraction": 0.25, "split_seed": 0})))
    return out


def test_both_new_datasets_load_and_check_out(config_dir):
    for name, n_train in (("stripes", 400), ("bands", 300)):
        cfg = build(DatasetConfig, yaml.safe_load((config_dir / "datasets" / f"{name}.yaml").read_text()))
        train, test = load_split(cfg, "train"), load_split(cfg, "test")
        assert len(train) == n_train and train.images.dtype == torch.uint8
        assert train.images.shape[1:] == (3, 16, 16) and train.num_classes == 4
        assert set(test.labels.tolist()) == {0, 1, 2, 3}


def test_stratified_split_is_seeded_and_keeps_class_proportions():
    labels = np.repeat(np.arange(5), [10, 20, 30, 40, 50])
    train, test = stratified_split(labels, 0.2, seed=3)
    assert np.bincount(labels[test]).tolist() == [2, 4, 6, 8, 10]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    again, other = stratified_split(labels, 0.2, seed=3)[1], stratified_split(labels, 0.2, seed=4)[1]
    assert np.array_equal(test, again) and not np.array_equal(test, other)


@pytest.mark.slow
@pytest.mark.ray
def test_one_epoch_sweep_on_an_outside_loader_and_a_yaml_only_dataset(ray_local, config_dir, tmp_path):
    from unmix_ray.orchestration.sweep import run_sweep

    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        "grid.dataset=[stripes, bands]", "grid.mixture=[both]", "grid.seed=[0]", "untrained_reference=false",
        "train.epochs=1",
        "train.batch_size=32", "eval.knn_k=10", "eval.linear_epochs=2", "eval.knn_every=1",
        "tune.max_concurrent_trials=1", f"tune.storage_path={tmp_path / 'ray'}", "datasets={}",
    ], config_dir=config_dir)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    table = run_sweep(sweep, uri)
    assert table.complete and sorted(r.dataset for r in table.records) == ["bands", "stripes"]
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("unmix-ray").experiment_id],
                                         "tags.`unmix.role` = 'trial'")
    assert {r.data.tags["dataset"]: r.info.status for r in runs} == {"bands": "FINISHED", "stripes": "FINISHED"}
    assert all(r.data.metrics["knn_top1"] > 25 for r in runs)  # better than chance (4 classes)


def fake_loader(monkeypatch, name: str, images: torch.Tensor, labels: torch.Tensor) -> str:
    module = types.ModuleType(name)
    module.LAYOUT = "anything"
    module.load = lambda root, split, **_: ImageSet(images, labels, 4)
    monkeypatch.setitem(sys.modules, name, module)
    return name


@pytest.mark.parametrize("images, problem", [
    (torch.rand(8, 3, 16, 16), "images are torch.float32; the loader must return uint8"),
    (torch.zeros(8, 3, 12, 12, dtype=torch.uint8), "images are 12x12; the config's image_size says 16x16"),
    (torch.zeros(8, 1, 16, 16, dtype=torch.uint8), "images have 1 channel(s); the config says 3"),
])
def test_a_loader_breaking_the_contract_fails_naming_the_dataset(monkeypatch, tmp_path, images, problem):
    loader = fake_loader(monkeypatch, "bad_loader_module", images, torch.zeros(8, dtype=torch.int64))
    cfg = build(DatasetConfig, dataset_yaml("digits", tmp_path, loader=loader))
    with pytest.raises(DatasetError) as e:
        load_split(cfg, "train")
    assert str(e.value).startswith("digits: ") and problem in str(e.value)


def test_a_missing_or_incomplete_loader_is_a_config_error(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match=r"loader: cannot import the loader module 'unmix_ray.data.digits'"):
        build(DatasetConfig, dataset_yaml("digits", tmp_path))
    monkeypatch.setitem(sys.modules, "half_loader", types.ModuleType("half_loader"))
    with pytest.raises(ConfigError, match="half_loader has no LAYOUT and no load"):
        build(DatasetConfig, dataset_yaml("digits", tmp_path, loader="half_loader"))
