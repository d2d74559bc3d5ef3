"""CIFAR-100 from the original python pickles: 50k train / 10k test, 32x32 RGB, 100 fine classes.

Same format as CIFAR-10 (see cifar10.py); the labels used are ``fine_labels`` (the 20 coarse
super-classes are ignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unmix_ray.data.cifar10 import (
    check_names,
    check_pickle,
    has_file,
    read_batch,
    split_dir,
    to_imageset,
    torchvision_download,
)
from unmix_ray.data.imageset import ImageSet

NAME = "cifar100"
DIR = "cifar-100-python"
SPLITS = ("train", "test")
META = "meta"
NUM_CLASSES = 100
LAYOUT = """<root>/cifar-100-python/   (or <root> itself; the folder in cifar-100-python.tar.gz)
    train   pickled dict: data uint8 [50000, 3072] (R, G, B planes, row-major), fine_labels, coarse_labels
    test    the same, 10000 images
    meta    pickled dict: fine_label_names (100 names), coarse_label_names (20)"""


def present(root: str | Path) -> bool:
    return has_file(root, DIR, META)


def check(root: str | Path, split: str, **_: Any) -> None:
    """What ``load`` needs, checked cheaply (files present and whole, not unpickled)."""
    d = split_dir(root, split, SPLITS, DIR, META, NAME, LAYOUT)
    for name in (META, split):
        check_pickle(d / name, NAME, LAYOUT)


def load(root: str | Path, split: str, **_: Any) -> ImageSet:
    d = split_dir(root, split, SPLITS, DIR, META, NAME, LAYOUT)
    check_names(d / META, "fine_label_names", NUM_CLASSES, NAME, LAYOUT)
    return to_imageset([read_batch(d / split, "fine_labels", NUM_CLASSES, NAME, LAYOUT)], NUM_CLASSES)


def download(root: str | Path) -> None:
    """Fetch the dataset with torchvision into ``root`` (needs internet)."""
    torchvision_download(root, "CIFAR100", [{"train": True}, {"train": False}], NAME, LAYOUT)
