"""Test data: tiny copies of each dataset, written in the dataset's exact original on-disk format, and
the loaders of the datasets ``configs/datasets/`` declares (``DATASETS``: name -> its module's ``load``).

``write_fixture(name, root, n_per_class=2)`` writes a few images per class and returns the folder to
use as the dataset's ``root`` (e.g. ``--set datasets.cifar10.root=<that>``); the real loaders read it
unchanged. Class counts default to the real ones (so the configs in configs/datasets/ apply as they
are); ``num_classes`` makes smaller ones (then override ``num_classes`` in the config too, or expect
the class-count error). Images are synthetic but class-structured (a colour and a stripe pattern per
class, plus noise), so a kNN monitor on a fixture has something to find.

Formats written: CIFAR python pickles (protocol 2, bytes keys, as Python 2 wrote them), STL-10
column-major binaries, Tiny ImageNet and ImageNet JPEG trees (with one greyscale JPEG, and for
ImageNet one PNG named .JPEG, as in the real data), Fashion-MNIST gzipped idx files.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
import yaml
from torchvision.io import encode_jpeg, encode_png

from unmix_ray.compose import known_names
from unmix_ray.config import CONFIG_DIR, DatasetConfig
from unmix_ray.data import dataset_module


def _declared_loaders() -> dict:
    out = {}
    for name in known_names("datasets"):
        data = yaml.safe_load((CONFIG_DIR / "datasets" / f"{name}.yaml").read_text())
        out[name] = dataset_module(DatasetConfig.model_construct(**data)).load
    return out


DATASETS = _declared_loaders()

REAL_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10, "tiny_imagenet": 200, "imagenet": 1000,
                "fashion_mnist": 10}


def write_fixture(name: str, root: str | Path, n_per_class: int = 2, *, num_classes: int | None = None,
                  seed: int = 0) -> Path:
    """Write a tiny ``name`` dataset under ``root`` and return the path to use as its config ``root``.

    Every labelled split gets ``n_per_class`` images per class (STL-10's unlabeled split and Tiny
    ImageNet's test split get as many unlabelled images as its train split has).
    """
    if name not in WRITERS:
        raise ValueError(f"unknown dataset {name!r} (have {', '.join(WRITERS)})")
    if n_per_class < 1:
        raise ValueError("n_per_class must be >= 1")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    k = num_classes if num_classes is not None else REAL_CLASSES[name]
    WRITERS[name](root, n_per_class, k, np.random.default_rng(seed))
    return root


def class_images(labels: np.ndarray, num_classes: int, height: int, width: int, channels: int,
                 rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, C, H, W]: a colour and a stripe pattern per class, plus noise."""
    n = len(labels)
    hue = labels / max(1, num_classes)
    colour = np.stack([0.5 + 0.5 * np.cos(2 * np.pi * (hue + s)) for s in (0.0, 1 / 3, 2 / 3)], 1)  # [N, 3]
    yy, xx = np.mgrid[0:height, 0:width]
    freq = (1 + labels % 4)[:, None, None]
    coord = np.where((labels % 2 == 0)[:, None, None], xx[None] / width, yy[None] / height)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq * coord)  # [N, H, W]
    img = 0.6 * colour[:, :, None, None] + 0.4 * stripes[:, None]
    if channels == 1:
        img = img.mean(1, keepdims=True)
    img = img * 255 + rng.normal(0, 12, size=(n, channels, height, width))
    return np.clip(img, 0, 255).astype(np.uint8)


def _balanced(n_per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(num_classes), n_per_class))


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


# ---- CIFAR ------------------------------------------------------------------------------------------------

def _cifar10(root: Path, n: int, k: int, rng: np.random.Generator) -> None:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    train = _balanced(n, k, rng)
    for i, part in enumerate(np.array_split(np.arange(len(train)), 5), 1):
        labels = train[part]
        _pickle(d / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels.tolist(),
            b"data": class_images(labels, k, 32, 32, 3, rng).reshape(len(labels), 3072),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(len(labels))]})
    test = _balanced(n, k, rng)
    _pickle(d / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test.tolist(),
                               b"data": class_images(test, k, 32, 32, 3, rng).reshape(len(test), 3072),
                               b"filenames": [f"test_{j}.png".encode() for j in range(len(test))]})
    _pickle(d / "batches.meta", {b"num_cases_per_batch": 10000, b"num_vis": 3072,
                                 b"label_names": [f"class{c}".encode() for c in range(k)]})


def _cifar100(root: Path, n: int, k: int, rng: np.random.Generator) -> None:
    d = root / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = _balanced(n, k, rng)
        _pickle(d / split, {b"filenames": [f"{split}_{j}.png".encode() for j in range(len(labels))],
                            b"batch_label": f"{split}ing batch 1 of 1".encode(),
                            b"fine_labels": labels.tolist(),
                            b"coarse_labels": (labels % 20).tolist(),
                            b"data": class_images(labels, k, 32, 32, 3, rng).reshape(len(labels), 3072)})
    _pickle(d / "meta", {b"fine_label_names": [f"fine{c}".encode() for c in range(k)],
                         b"coarse_label_names": [f"coarse{c}".encode() for c in range(20)]})


# ---- STL-10 -----------------------------------------------------------------------------------------------

def stl10_bytes(images: np.ndarray) -> bytes:
    """uint8 [N, 3, 96, 96] (row-major planes) -> the STL-10 byte order (column-major planes)."""
    return np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()


def _stl10(root: Path, n: int, k: int, rng: np.random.Generator) -> None:
    d = root / "stl10_binary"
    d.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        labels = _balanced(n, k, rng)
        (d / f"{split}_X.bin").write_bytes(stl10_bytes(class_images(labels, k, 96, 96, 3, rng)))
        (d / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
    hidden = _balanced(n, k, rng)
    (d / "unlabeled_X.bin").write_bytes(stl10_bytes(class_images(hidden, k, 96, 96, 3, rng)))
    (d / "class_names.txt").write_text("".join(f"class{c}\n" for c in range(k)))
    folds = np.array_split(np.arange(n * k), 10)
    (d / "fold_indices.txt").write_text("".join(" ".join(map(str, f)) + " \n" for f in folds))


# ---- JPEG trees -------------------------------------------------------------------------------------------

def _wnids(k: int) -> list[str]:
    return [f"n{1440764 + 7919 * c:08d}" for c in range(k)]


def _jpeg(path: Path, image: np.ndarray, grey: bool = False) -> None:
    t = torch.from_numpy(image)
    if grey:
        t = t.float().mean(0, keepdim=True).to(torch.uint8)
    path.write_bytes(encode_jpeg(t, quality=90).numpy().tobytes())


def _tiny_imagenet(root: Path, n: int, k: int, rng: np.random.Generator) -> None:
    d = root / "tiny-imagenet-200"
    wnids = _wnids(k)
    (d / "val" / "images").mkdir(parents=True, exist_ok=True)
    (d / "test" / "images").mkdir(parents=True, exist_ok=True)
    (d / "wnids.txt").write_text("".join(f"{w}\n" for w in rng.permutation(wnids)))
    (d / "words.txt").write_text("".join(f"{w}\tthing {c}\n" for c, w in enumerate(wnids)))
    for c, w in enumerate(wnids):
        folder = d / "train" / w / "images"
        folder.mkdir(parents=True, exist_ok=True)
        images = class_images(np.full(n, c), k, 64, 64, 3, rng)
        for i in range(n):
            _jpeg(folder / f"{w}_{i}.JPEG", images[i], grey=(c == 0 and i == 0))
        boxes = "".join(f"{w}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(n))
        (d / "train" / w / f"{w}_boxes.txt").write_text(boxes)
    val = _balanced(n, k, rng)
    images = class_images(val, k, 64, 64, 3, rng)
    lines = []
    for i, c in enumerate(val):
        _jpeg(d / "val" / "images" / f"val_{i}.JPEG", images[i])
        lines.append(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t63\t63\n")
    (d / "val" / "val_annotations.txt").write_text("".join(lines))
    for i, img in enumerate(class_images(_balanced(n, k, rng), k, 64, 64, 3, rng)):
        _jpeg(d / "test" / "images" / f"test_{i}.JPEG", img)


def _imagenet(root: Path, n: int, k: int, rng: np.random.Generator) -> None:
    wnids = _wnids(k)
    val_id = 0
    for split in ("train", "val"):
        for c, w in enumerate(wnids):
            folder = root / split / w
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, wd = int(rng.integers(48, 97)), int(rng.integers(48, 129))  # real images vary in size
                img = class_images(np.array([c]), k, h, wd, 3, rng)[0]
                if split == "train":
                    path = folder / f"{w}_{i}.JPEG"
                else:
                    val_id += 1
                    path = folder / f"ILSVRC2012_val_{val_id:08d}.JPEG"
                if split == "train" and c == 0 and i == 0:  # ImageNet has a PNG named .JPEG
                    path.write_bytes(encode_png(torch.from_numpy(img)).numpy().tobytes())
                else:
                    _jpeg(path, img, grey=(split == "train" and c == min(1, k - 1) and i == 0))


# ---- Fashion-MNIST ----------------------------------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    """uint8 array -> idx format (magic 0x0000 08 <ndim>, big-endian dimensions, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _fashion_mnist(root: Path, n: int, k: int, rng: np.random.Generator) -> None:
    for prefix in ("train", "t10k"):
        labels = _balanced(n, k, rng)
        images = class_images(labels, k, 28, 28, 1, rng)[:, 0]
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(idx_bytes(images))
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(idx_bytes(labels.astype(np.uint8)))


WRITERS = {"cifar10": _cifar10, "cifar100": _cifar100, "stl10": _stl10, "tiny_imagenet": _tiny_imagenet,
           "imagenet": _imagenet, "fashion_mnist": _fashion_mnist}
