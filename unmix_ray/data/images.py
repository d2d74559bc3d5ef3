"""JPEG decoding for the image-folder datasets, and a per-node cache of decoded arrays.

Decoding uses ``torchvision.io.decode_jpeg`` (libjpeg-turbo) on lists of files, in a thread pool.
A file that is not a JPEG after all (ImageNet holds a PNG and a few CMYK JPEGs named .JPEG) falls
back to ``decode_image``; grey and CMYK images come out RGB.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from unmix_ray.concurrency import file_lock, run_parallel
from unmix_ray.data.errors import DatasetError

log = logging.getLogger(__name__)

CACHE_DIR = ".unmix_cache"
CHUNK = 256  # files per decode call


def default_workers(requested: int | None = None) -> int:
    if requested is not None:
        return max(1, requested)
    return max(1, min(8, len(os.sched_getaffinity(0))))


def read_bytes(path: Path, dataset: str, layout: str) -> torch.Tensor:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(dataset, path, f"unreadable file ({e.strerror or e})", layout) from e
    if not data:
        raise DatasetError(dataset, path, "empty file", layout)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_one(data: torch.Tensor, path: Path, dataset: str, layout: str) -> torch.Tensor:
    """uint8 bytes -> uint8 RGB [3, H, W]."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        try:
            return decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DatasetError(dataset, path, f"not a decodable image ({first})", layout) from e


def _decode_chunk(paths: Sequence[Path], dataset: str, layout: str) -> list[torch.Tensor]:
    data = [read_bytes(p, dataset, layout) for p in paths]
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except RuntimeError:  # find the odd file, and decode it some other way or name it
        return [decode_one(d, p, dataset, layout) for d, p in zip(data, paths, strict=True)]


def decode_fixed_size(paths: Sequence[Path], size: int, dataset: str, layout: str,
                      workers: int | None = None) -> torch.Tensor:
    """Decode images that must all be ``size`` x ``size`` into one uint8 tensor [N, 3, size, size]."""
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)

    def run(start: int) -> None:
        chunk = paths[start:start + CHUNK]
        for i, (img, path) in enumerate(zip(_decode_chunk(chunk, dataset, layout), chunk, strict=True)):
            if tuple(img.shape[1:]) != (size, size):
                raise DatasetError(dataset, path, f"image is {img.shape[2]}x{img.shape[1]}, expected "
                                   f"{size}x{size}", layout)
            out[start + i] = img

    run_parallel(run, range(0, len(paths), CHUNK), default_workers(workers))
    return out


def files_key(paths: Sequence[Path], extra: str = "") -> str:
    """A fingerprint of a file list: names, sizes and mtimes (so an edited file invalidates a cache)."""
    h = hashlib.sha256(extra.encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


Arrays = tuple[torch.Tensor, torch.Tensor]


def cached_arrays(root: Path, name: str, key: str, build: Callable[[], Arrays]) -> Arrays:
    """``build()`` once per node: its (images, labels) are saved under ``root/.unmix_cache`` and later
    loads (other trials, other workers of the same node) read them back. Several processes starting
    together wait for the first one to finish. Without a writable ``root`` it just builds."""
    cache = root / CACHE_DIR
    try:
        cache.mkdir(exist_ok=True)
    except OSError:
        return build()
    if not os.access(cache, os.W_OK):
        return build()
    images_path, labels_path = cache / f"{name}-{key}.images.npy", cache / f"{name}-{key}.labels.npy"
    with file_lock(cache / f"{name}.lock", what=f"decoding {name}"):
        if images_path.exists() and labels_path.exists():
            try:
                images, labels = np.load(images_path), np.load(labels_path)
                return torch.from_numpy(images), torch.from_numpy(labels)
            except (OSError, ValueError) as e:
                log.warning("unreadable cache %s (%s); decoding again", images_path, e)
        images, labels = build()
        for stale in cache.glob(f"{name}-*.npy"):
            stale.unlink(missing_ok=True)
        for path, arr in ((images_path, images), (labels_path, labels)):
            tmp = path.with_name(path.name + ".tmp.npy")
            np.save(tmp, arr.numpy())
            os.replace(tmp, path)
        return images, labels
