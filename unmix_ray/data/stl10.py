"""STL-10 from the original binaries (Coates et al., 2011): 96x96 RGB, 10 classes.

5k labelled train (10 predefined folds are not used), 8k test, 100k unlabeled images. Each image in
``*_X.bin`` is 3 x 96 x 96 uint8, each colour plane stored column-major (MATLAB order), so a plane
read row-major comes out transposed. Labels in ``*_y.bin`` are one byte each, 1..10. The unlabeled
split gets label -1. Pre-training uses train + unlabeled (``pretrain_splits``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmix_ray.data.cifar10 import find_dir, has_file, torchvision_download
from unmix_ray.data.errors import DatasetError
from unmix_ray.data.imageset import ImageSet

NAME = "stl10"
DIR = "stl10_binary"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
NUM_CLASSES = 10
SPLITS = {"train": ("train_X.bin", "train_y.bin"), "test": ("test_X.bin", "test_y.bin"),
          "unlabeled": ("unlabeled_X.bin", None)}
LAYOUT = """<root>/stl10_binary/   (or <root> itself; the folder in stl10_binary.tar.gz)
    train_X.bin       uint8, 5000 x 3 x 96 x 96, each plane column-major
    train_y.bin       uint8, 5000 labels in 1..10
    test_X.bin        uint8, 8000 x 3 x 96 x 96
    test_y.bin        uint8, 8000 labels in 1..10
    unlabeled_X.bin   uint8, 100000 x 3 x 96 x 96
    class_names.txt   10 lines (optional; checked when present)"""
CHUNK = 2048  # images per read while transposing


def image_count(path: Path) -> int:
    """The number of images in a ``*_X.bin`` file, from its size."""
    if not path.is_file():
        raise DatasetError(NAME, path, "missing file", LAYOUT)
    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise DatasetError(NAME, path, f"{size} bytes is not a whole number of 3x96x96 images "
                           f"({IMAGE_BYTES} bytes each): truncated or not an STL-10 file", LAYOUT)
    return size // IMAGE_BYTES


def read_images(path: Path) -> torch.Tensor:
    """``*_X.bin`` -> uint8 [N, 3, 96, 96], read in chunks (the unlabeled file is 2.8 GB)."""
    n = image_count(path)
    out = torch.empty(n, 3, SIDE, SIDE, dtype=torch.uint8)
    with open(path, "rb") as f:
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            raw = np.frombuffer(f.read(k * IMAGE_BYTES), dtype=np.uint8).reshape(k, 3, SIDE, SIDE)
            out[start:start + k] = torch.from_numpy(raw.transpose(0, 1, 3, 2).copy())
    return out


def read_labels(path: Path, n: int) -> torch.Tensor:
    if not path.is_file():
        raise DatasetError(NAME, path, "missing file", LAYOUT)
    labels = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if labels.size != n:
        raise DatasetError(NAME, path, f"{labels.size} labels for {n} images", LAYOUT)
    if labels.size and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise DatasetError(NAME, path, f"labels span {labels.min()}..{labels.max()}, expected "
                           f"1..{NUM_CLASSES}", LAYOUT)
    return torch.from_numpy(labels - 1)


def present(root: str | Path) -> bool:
    return has_file(root, DIR, "test_X.bin")


def check(root: str | Path, split: str, **_: Any) -> None:
    """What ``load`` needs, checked cheaply (file sizes, no reading)."""
    if split not in SPLITS:
        raise DatasetError(NAME, root, f"unknown split {split!r} (have {', '.join(SPLITS)})", LAYOUT)
    images_file, labels_file = SPLITS[split]
    d = find_dir(root, DIR, images_file, NAME, LAYOUT)
    n = image_count(d / images_file)
    if labels_file is not None:
        path = d / labels_file
        if not path.is_file():
            raise DatasetError(NAME, path, "missing file", LAYOUT)
        if path.stat().st_size != n:
            raise DatasetError(NAME, path, f"{path.stat().st_size} labels for {n} images", LAYOUT)


def load(root: str | Path, split: str, **_: Any) -> ImageSet:
    if split not in SPLITS:
        raise DatasetError(NAME, root, f"unknown split {split!r} (have {', '.join(SPLITS)})", LAYOUT)
    images_file, labels_file = SPLITS[split]
    d = find_dir(root, DIR, images_file, NAME, LAYOUT)
    names = d / "class_names.txt"
    if names.is_file():
        count = len([line for line in names.read_text().splitlines() if line.strip()])
        if count != NUM_CLASSES:
            raise DatasetError(NAME, names, f"{count} class names, expected {NUM_CLASSES}", LAYOUT)
    images = read_images(d / images_file)
    if labels_file is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
    else:
        labels = read_labels(d / labels_file, images.shape[0])
    return ImageSet(images, labels, NUM_CLASSES)


def download(root: str | Path) -> None:
    """Fetch the dataset with torchvision into ``root`` (2.6 GB; needs internet)."""
    torchvision_download(root, "STL10", [{"split": s} for s in ("train", "test", "unlabeled")], NAME, LAYOUT)
