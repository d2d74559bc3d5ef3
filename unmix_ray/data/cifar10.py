"""CIFAR-10 from the original python pickles (Krizhevsky, 2009): 50k train / 10k test, 32x32 RGB.

Also the shared reader for CIFAR-100 (same format, see cifar100.py). Each batch file is a pickled
dict (written by Python 2) with ``data``: uint8 [N, 3072], one image per row as 1024 red, 1024 green,
then 1024 blue values, each plane row-major; and a list of labels. The unpickler only admits what
those files contain (dicts, lists, strings and numpy arrays), so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmix_ray.data.errors import DatasetError
from unmix_ray.data.imageset import ImageSet

NAME = "cifar10"
DIR = "cifar-10-batches-py"
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
META = "batches.meta"
NUM_CLASSES = 10
LAYOUT = """<root>/cifar-10-batches-py/   (or <root> itself; the folder in cifar-10-python.tar.gz)
    data_batch_1 ... data_batch_5   pickled dicts: data uint8 [10000, 3072] (R, G, B planes,
                                    each row-major) and labels (10000 ints in 0..9)
    test_batch                      the same, 10000 images
    batches.meta                    pickled dict: label_names (10 names)"""

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR file")


def _text(v: Any) -> Any:
    return v.decode("latin1") if isinstance(v, bytes) else v


def read_pickle(path: Path, dataset: str, layout: str) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (Python 2 files have bytes keys)."""
    if not path.is_file():
        raise DatasetError(dataset, path, "missing file", layout)
    try:
        with open(path, "rb") as f:
            data = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DatasetError(dataset, path, f"not a CIFAR pickle, or truncated ({type(e).__name__}: {e})",
                           layout) from e
    if not isinstance(data, dict):
        raise DatasetError(dataset, path, f"expected a pickled dict, found {type(data).__name__}", layout)
    return {_text(k): v for k, v in data.items()}


def find_dir(root: str | Path, dirname: str, marker: str, dataset: str, layout: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(dataset, root, "data root not found", layout)
    for d in (root / dirname, root):
        if (d / marker).exists():
            return d
    raise DatasetError(dataset, root / dirname, f"missing {marker} (not a {dataset} folder)", layout)


def read_batch(path: Path, label_key: str, num_classes: int, dataset: str, layout: str) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    d = read_pickle(path, dataset, layout)
    data, labels = d.get("data"), d.get(label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise DatasetError(dataset, path, f"expected keys 'data' (numpy array) and {label_key!r}, found "
                           f"{sorted(d)}", layout)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(dataset, path, f"data is {data.dtype} {list(data.shape)}, expected uint8 "
                           "[N, 3072]", layout)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DatasetError(dataset, path, f"{data.shape[0]} images but {labels.size} labels", layout)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(dataset, path, f"labels span {labels.min()}..{labels.max()}, outside the "
                           f"{num_classes} classes", layout)
    return data, labels


def check_names(path: Path, key: str, expected: int, dataset: str, layout: str) -> None:
    names = read_pickle(path, dataset, layout).get(key)
    if not isinstance(names, list):
        raise DatasetError(dataset, path, f"no {key!r} list in the metadata", layout)
    if len(names) != expected:
        raise DatasetError(dataset, path, f"{len(names)} class names, expected {expected}", layout)


def to_imageset(parts: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> ImageSet:
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageSet(images, torch.from_numpy(labels), num_classes)


def has_file(root: str | Path, dirname: str, name: str) -> bool:
    """Whether ``name`` is in ``root/dirname`` or in ``root`` itself."""
    root = Path(root).expanduser()
    return any((d / name).exists() for d in (root / dirname, root))


def torchvision_download(root: str | Path, dataset_class: str, calls: list[dict[str, Any]], dataset: str,
                         layout: str) -> None:
    """``torchvision.datasets.<dataset_class>(root, download=True, **kw)`` for each ``kw`` of ``calls``."""
    import torchvision

    try:
        for kw in calls:
            getattr(torchvision.datasets, dataset_class)(str(root), download=True, **kw)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise DatasetError(dataset, root, f"torchvision download failed ({e}); without internet, provide the "
                           "files or an S3 source", layout) from e


def check_pickle(path: Path, dataset: str, layout: str) -> None:
    """A pickle file that is there and whole, without unpickling it: every pickle ends with the STOP
    opcode, which a truncated file has lost."""
    if not path.is_file():
        raise DatasetError(dataset, path, "missing file", layout)
    try:
        with open(path, "rb") as f:
            first = f.read(1)
            f.seek(-1, 2)
            last = f.read(1)
    except OSError as e:
        raise DatasetError(dataset, path, f"unreadable file ({e})", layout) from e
    if first != b"\x80" or last != b".":
        raise DatasetError(dataset, path, "not a CIFAR pickle, or truncated (no pickle header or no STOP at its "
                           "end)", layout)


def present(root: str | Path) -> bool:
    return has_file(root, DIR, META)


def split_dir(root: str | Path, split: str, splits: Iterable[str], folder: str, meta: str, name: str,
              layout: str) -> Path:
    """The folder of a CIFAR-format dataset holding ``split``; a DatasetError names the splits there are."""
    if split not in splits:
        raise DatasetError(name, root, f"unknown split {split!r} (have {', '.join(splits)})", layout)
    return find_dir(root, folder, meta, name, layout)


def check(root: str | Path, split: str, **_: Any) -> None:
    """What ``load`` needs, checked cheaply (files present and whole, not unpickled)."""
    d = split_dir(root, split, SPLITS, DIR, META, NAME, LAYOUT)
    for name in (META, *SPLITS[split]):
        check_pickle(d / name, NAME, LAYOUT)


def load(root: str | Path, split: str, **_: Any) -> ImageSet:
    d = split_dir(root, split, SPLITS, DIR, META, NAME, LAYOUT)
    check_names(d / META, "label_names", NUM_CLASSES, NAME, LAYOUT)
    return to_imageset([read_batch(d / f, "labels", NUM_CLASSES, NAME, LAYOUT) for f in SPLITS[split]],
                       NUM_CLASSES)


def download(root: str | Path) -> None:
    """Fetch the dataset with torchvision into ``root`` (needs internet)."""
    torchvision_download(root, "CIFAR10", [{"train": True}, {"train": False}], NAME, LAYOUT)
