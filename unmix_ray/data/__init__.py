"""Dataset registry: name -> ``load(root, split) -> ImageSet``, one module per dataset format."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from unmix_ray.config import DatasetConfig
from unmix_ray.data import fashion_mnist
from unmix_ray.data.errors import DatasetError
from unmix_ray.data.imageset import ImageSet

__all__ = ["DATASETS", "DatasetError", "ImageSet", "load_pretrain", "load_split"]

DATASETS: dict[str, Callable[[str | Path, str], ImageSet]] = {
    "fashion_mnist": fashion_mnist.load,
}


def load_split(config: DatasetConfig, split: str) -> ImageSet:
    data = DATASETS[config.name](config.root, split)
    if data.num_classes != config.num_classes or tuple(data.images.shape[1:2]) != (config.channels,):
        raise DatasetError(
            config.name, config.root,
            f"split {split!r} has {data.num_classes} classes and {data.images.shape[1]} channels; the config "
            f"says {config.num_classes} and {config.channels}", f"see unmix_ray/data/{config.name}.py",
        )
    return data


def load_pretrain(config: DatasetConfig, seed: int) -> ImageSet:
    """The pretraining images (all of ``pretrain_splits``), subsetted as configured."""
    data = ImageSet.concat([load_split(config, s) for s in config.pretrain_splits])
    return data.subset(config.train_subset, seed)
