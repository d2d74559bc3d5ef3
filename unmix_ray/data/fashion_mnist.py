"""Fashion-MNIST from its original idx files (Xiao et al., 2017): 60k train / 10k test, 28x28 grey.

Debian's ``dataset-fashion-mnist`` installs them under /usr/share/datasets/fashion-mnist/.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmix_ray.data.errors import DatasetError
from unmix_ray.data.imageset import ImageSet

NAME = "fashion_mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}
LAYOUT = """<root>/train-images-idx3-ubyte[.gz]  (idx3, uint8, 60000 x 28 x 28)
<root>/train-labels-idx1-ubyte[.gz]  (idx1, uint8, 60000)
<root>/t10k-images-idx3-ubyte[.gz]   (idx3, uint8, 10000 x 28 x 28)
<root>/t10k-labels-idx1-ubyte[.gz]   (idx1, uint8, 10000)
(install with: apt-get install dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist)"""


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise DatasetError(NAME, root / f"{stem}.gz", "missing file", LAYOUT)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file (gzipped or not) of unsigned bytes with ``ndim`` dimensions."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(NAME, path, f"unreadable or truncated file ({e})", LAYOUT) from e
    if len(data) < 4 + 4 * ndim or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise DatasetError(NAME, path, f"not an idx{ndim} uint8 file (bad header)", LAYOUT)
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DatasetError(NAME, path, f"truncated: header says {shape}, found {body.size} bytes", LAYOUT)
    return body.reshape(shape)


def _check_file(path: Path, ndim: int) -> None:
    """Header and size of an idx file without decoding it: a gzip's last 4 bytes hold its uncompressed
    size (mod 2**32), which a truncated file gets wrong."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
        if len(header) < 4 + 4 * ndim or header[:2] != b"\0\0" or header[2] != 0x08 or header[3] != ndim:
            raise DatasetError(NAME, path, f"not an idx{ndim} uint8 file (bad header)", LAYOUT)
        shape = [int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        expected = 4 + 4 * ndim + int(np.prod(shape))
        if path.suffix == ".gz":
            with open(path, "rb") as f:
                f.seek(-4, 2)
                size = int.from_bytes(f.read(4), "little")
            if size != expected % 2**32:
                raise DatasetError(NAME, path, f"truncated: header says {tuple(shape)}, the gzip holds {size} "
                                   f"bytes, expected {expected}", LAYOUT)
        elif path.stat().st_size != expected:
            raise DatasetError(NAME, path, f"truncated: header says {tuple(shape)}, the file has "
                               f"{path.stat().st_size} bytes, expected {expected}", LAYOUT)
    except (OSError, EOFError) as e:
        raise DatasetError(NAME, path, f"unreadable or truncated file ({e})", LAYOUT) from e


def _split_files(root: str | Path, split: str) -> tuple[Path, Path, int]:
    """The split's images and labels files under ``root`` and its image count; a DatasetError otherwise."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(NAME, root, "data root not found", LAYOUT)
    if split not in FILES:
        raise DatasetError(NAME, root, f"unknown split {split!r} (have {', '.join(FILES)})", LAYOUT)
    images_stem, labels_stem, count = FILES[split]
    return _find(root, images_stem), _find(root, labels_stem), count


def check(root: str | Path, split: str, **_: Any) -> None:
    """What ``load`` needs, checked cheaply (headers and sizes, no decoding)."""
    images, labels, _count = _split_files(root, split)
    _check_file(images, 3)
    _check_file(labels, 1)


def load(root: str | Path, split: str, **_: Any) -> ImageSet:
    images_path, labels_path, count = _split_files(root, split)
    images = read_idx(images_path, 3)
    labels = read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(NAME, root, f"{images.shape[0]} images but {labels.shape[0]} labels", LAYOUT)
    if labels.size and labels.max() >= 10:
        raise DatasetError(NAME, root, f"label {labels.max()} outside the 10 classes", LAYOUT)
    images_t = torch.from_numpy(images.copy()).unsqueeze(1)
    return ImageSet(images_t, torch.from_numpy(labels.astype(np.int64)), 10)
