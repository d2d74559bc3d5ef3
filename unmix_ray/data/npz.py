"""Any small image dataset as NumPy ``.npz`` files: the format for a dataset that needs only a YAML.

``<root>/<split>.npz`` holds ``images`` (uint8: [N, H, W] grey, [N, H, W, C] or [N, C, H, W]) and
``labels`` (integers 0..K-1, or -1 for unlabelled images). A dataset shipped as one file can be split
by a seeded stratified draw instead, with ``loader_options`` in its YAML::

    loader: unmix_ray.data.npz
    loader_options: {split_from: all, test_fraction: 0.2, split_seed: 0}

Then ``train`` and ``test`` are drawn from ``<root>/all.npz``: within each class, a fraction
``test_fraction`` (rounded) of its samples goes to ``test``, chosen by ``split_seed``; the rest to ``train``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmix_ray.data.errors import DatasetError
from unmix_ray.data.imageset import ImageSet

NAME = "npz"
LAYOUT = """<root>/<split>.npz   images: uint8 [N, H, W] (grey), [N, H, W, C] or [N, C, H, W] (C = 1 or 3)
                     labels: integers [N], 0..K-1 (-1: unlabelled)
(with loader_options.split_from: <root>/<split_from>.npz, split into train/test by a seeded stratified draw)"""


def _read(path: Path, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(dataset, path, "missing file", LAYOUT)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("images", "labels") if k not in f.files]
            if missing:
                raise DatasetError(dataset, path, f"no array named {', '.join(missing)} (has {f.files})", LAYOUT)
            return f["images"], f["labels"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DatasetError(dataset, path, f"unreadable or truncated .npz ({e})", LAYOUT) from e


def check(root: str | Path, split: str, *, dataset: str = NAME, split_from: str | None = None,
          **_: Any) -> None:
    """The file of ``split`` is there and its zip directory lists ``images`` and ``labels`` (nothing read)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(dataset, root, "data root not found", LAYOUT)
    path = root / f"{split}.npz"
    if split_from is not None and not path.is_file():
        path = root / f"{split_from}.npz"
    if not path.is_file():
        raise DatasetError(dataset, path, "missing file", LAYOUT)
    try:
        with zipfile.ZipFile(path) as z:
            names = {n.removesuffix(".npy") for n in z.namelist()}
    except (OSError, zipfile.BadZipFile) as e:
        raise DatasetError(dataset, path, f"unreadable or truncated .npz ({e})", LAYOUT) from e
    missing = sorted({"images", "labels"} - names)
    if missing:
        raise DatasetError(dataset, path, f"no array named {', '.join(missing)}", LAYOUT)


def _nchw(images: np.ndarray, path: Path, dataset: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
            return images.transpose(0, 3, 1, 2)
        return images
    raise DatasetError(dataset, path, f"images have shape {images.shape}; expected 3 or 4 dimensions", LAYOUT)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), both sorted: per class, ``round(test_fraction * n_class)`` samples
    drawn by ``seed`` go to test."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.append(rng.permutation(idx)[: int(round(test_fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test)) if test else np.array([], dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def load(root: str | Path, split: str, *, dataset: str = NAME, num_classes: int | None = None,
         split_from: str | None = None, test_fraction: float = 0.2, split_seed: int = 0, **_: Any) -> ImageSet:
    """One split; ``num_classes`` is the count the dataset declares (default: the largest label + 1)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(dataset, root, "data root not found", LAYOUT)
    if split_from is not None and not (root / f"{split}.npz").is_file():
        if split not in ("train", "test"):
            raise DatasetError(dataset, root, f"unknown split {split!r} (a split_from dataset has train and test)",
                               LAYOUT)
        path = root / f"{split_from}.npz"
        images, labels = _read(path, dataset)
        train_idx, test_idx = stratified_split(labels, test_fraction, split_seed)
        keep = train_idx if split == "train" else test_idx
        images, labels = images[keep], labels[keep]
    else:
        path = root / f"{split}.npz"
        images, labels = _read(path, dataset)
    if len(images) != len(labels):
        raise DatasetError(dataset, path, f"{len(images)} images but {len(labels)} labels", LAYOUT)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(dataset, path, f"labels are {labels.dtype}; expected integers", LAYOUT)
    images = _nchw(images, path, dataset)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                    num_classes)
