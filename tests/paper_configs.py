"""Test scaffolding: a config directory in which every dataset and method that
``configs/sweeps/paper.yaml`` names exists, so the paper sweep's structure (grid, per-recipe
overrides, plan) can be tested before those datasets and methods are registered.

The stand-in datasets carry the real datasets' shapes and split names; the stand-in methods are
SimCLR under the names of methods not registered yet (a registered method keeps its real config, which
the sweep's per-cell recipes are written for). Nothing is loaded or trained, so only the structure is
exercised.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from unmix_ray.config import CONFIG_DIR

PAPER_SWEEP = CONFIG_DIR / "sweeps" / "paper.yaml"
PAPER_DATASETS = ["cifar10", "cifar100", "stl10", "tiny_imagenet", "imagenet"]
PAPER_METHODS = ["simclr", "byol", "moco_v1", "moco_v2", "swav"]

_SHAPES = {
    "cifar10": dict(num_classes=10, image_size=32, crop_size=32, pretrain_splits=["train"],
                    test_split="test"),
    "cifar100": dict(num_classes=100, image_size=32, crop_size=32, pretrain_splits=["train"],
                     test_split="test"),
    "stl10": dict(num_classes=10, image_size=96, crop_size=64, pretrain_splits=["train", "unlabeled"],
                  test_split="test"),
    "tiny_imagenet": dict(num_classes=200, image_size=64, crop_size=64, pretrain_splits=["train"],
                          test_split="val"),
    "imagenet": dict(num_classes=1000, image_size=256, crop_size=224, pretrain_splits=["train"],
                     test_split="val"),
}


def missing_paper_components() -> list[str]:
    """Datasets/methods of the paper sweep that are not registered (or have no config file) yet."""
    from unmix_ray.methods import METHODS

    out = [f"dataset {d}" for d in PAPER_DATASETS if not (CONFIG_DIR / "datasets" / f"{d}.yaml").is_file()]
    out += [f"method {m}" for m in PAPER_METHODS
            if m not in METHODS or not (CONFIG_DIR / "methods" / f"{m}.yaml").is_file()]
    return out


def standin_config_dir(tmp_path: Path, monkeypatch) -> Path:
    """A copy of configs/ with stand-in configs for all paper datasets and methods, registered in
    the dataset/method registries for the duration of the test (``monkeypatch``)."""
    from unmix_ray.methods import METHODS, SimCLR

    config_dir = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, config_dir)
    for name, shape in _SHAPES.items():
        data = dict(name=name, root=f"/mnt/data/{name}", loader="unmix_ray.data.fashion_mnist", channels=3,
                    mean=[0.5] * 3, std=[0.25] * 3, train_split="train", **shape)
        (config_dir / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(data))
    simclr = yaml.safe_load((CONFIG_DIR / "methods" / "simclr.yaml").read_text())
    for name in PAPER_METHODS:
        if name in METHODS and (CONFIG_DIR / "methods" / f"{name}.yaml").is_file():
            continue  # registered: its real config takes the sweep's per-cell recipe
        (config_dir / "methods" / f"{name}.yaml").write_text(yaml.safe_dump(simclr | {"name": name}))
        monkeypatch.setitem(METHODS, name, SimCLR)
    return config_dir
