"""A dataset loader module outside ``unmix_ray``: what a user writes to add a dataset of their own.

"Stripes": 16x16 RGB images whose class is the orientation and colour of a stripe pattern, drawn
from a seed stored in ``<root>/seed.txt``, so the loader reads a file like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmix_ray.data import DatasetError, ImageSet

LAYOUT = "<root>/seed.txt   one integer: the seed the images are drawn from"
SPLITS = {"train": 400, "test": 100}
CLASSES = 4


def load(root: str | Path, split: str, *, dataset: str = "stripes", **_: Any) -> ImageSet:
    path = Path(root) / "seed.txt"
    if not path.is_file():
        raise DatasetError(dataset, path, "missing file", LAYOUT)
    if split not in SPLITS:
        raise DatasetError(dataset, root, f"unknown split {split!r}", LAYOUT)
    rng = np.random.default_rng([int(path.read_text()), list(SPLITS).index(split)])
    n = SPLITS[split]
    labels = np.arange(n) % CLASSES
    y, x = np.mgrid[0:16, 0:16]
    images = np.empty((n, 3, 16, 16), dtype=np.uint8)
    for i, c in enumerate(labels):
        wave = np.sin((x if c % 2 else y) * (1.0 + c) + rng.uniform(0, 6.28))
        colour = np.eye(3)[c % 3] * 0.6 + 0.2
        noisy = 0.5 + 0.4 * wave[None] * colour[:, None, None] + rng.normal(0, 0.05, (3, 16, 16))
        images[i] = np.clip(noisy * 255, 0, 255).astype(np.uint8)
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), CLASSES)
