"""Tiny ImageNet (Stanford CS231n): 200 classes, 64x64 RGB JPEGs, 100k train / 10k val.

The official test split has no labels; evaluation uses ``val`` (the dataset configs name it as the
test split). Class indices follow the sorted WordNet ids of ``wnids.txt``. All 110k images fit in
memory (1.35 GB): they are decoded once, in parallel, and the arrays cached under
``<root>/.unmix_cache`` when the root is writable, so later trials on the node load them directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from unmix_ray.data.errors import DatasetError
from unmix_ray.data.images import cached_arrays, decode_fixed_size, files_key
from unmix_ray.data.imageset import ImageSet

NAME = "tiny_imagenet"
DIR = "tiny-imagenet-200"
SIDE = 64
SPLITS = ("train", "val")
LAYOUT = """<root>/tiny-imagenet-200/   (or <root> itself; the folder in tiny-imagenet-200.zip)
    wnids.txt                              the class WordNet ids, one a line (200)
    train/<wnid>/images/<wnid>_<i>.JPEG    500 images per class, 64x64
    val/images/val_<i>.JPEG                10000 images, 64x64
    val/val_annotations.txt                one line per val image: <file> TAB <wnid> TAB <box: 4 ints>"""


def read_wnids(d: Path) -> list[str]:
    path = d / "wnids.txt"
    if not path.is_file():
        raise DatasetError(NAME, path, "missing file", LAYOUT)
    wnids = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(NAME, path, f"{len(wnids)} ids, {len(set(wnids))} distinct: expected distinct ids",
                           LAYOUT)
    return sorted(wnids)


def list_split(d: Path, split: str, wnids: list[str]) -> tuple[list[Path], list[int]]:
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for w in wnids:
            folder = d / "train" / w / "images"
            if not folder.is_dir():
                raise DatasetError(NAME, folder, f"missing the image folder of class {w}", LAYOUT)
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
            if not files:
                raise DatasetError(NAME, folder, f"no JPEGs for class {w}", LAYOUT)
            paths += files
            labels += [index[w]] * len(files)
        return paths, labels
    ann = d / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetError(NAME, ann, "missing file", LAYOUT)
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetError(NAME, ann, f"line {n} is not <file>\\t<wnid>...: {line[:80]!r}", LAYOUT)
        if fields[1] not in index:
            raise DatasetError(NAME, ann, f"line {n}: class {fields[1]!r} is not in wnids.txt", LAYOUT)
        path = d / "val" / "images" / fields[0]
        if not path.is_file():
            raise DatasetError(NAME, path, f"listed on line {n} of val_annotations.txt but missing", LAYOUT)
        paths.append(path)
        labels.append(index[fields[1]])
    if not paths:
        raise DatasetError(NAME, ann, "no annotated images", LAYOUT)
    return paths, labels


def find_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(NAME, root, "data root not found", LAYOUT)
    for d in (root / DIR, root):
        if (d / "wnids.txt").exists():
            return d
    raise DatasetError(NAME, root / DIR, "missing wnids.txt (not a Tiny ImageNet folder)", LAYOUT)


def check(root: str | Path, split: str, **_: Any) -> tuple[list[Path], list[int]]:
    """What ``load`` needs, checked cheaply (the class list and every listed file present, nothing
    decoded); returns the split's files and labels."""
    if split not in SPLITS:
        hint = " (the official test split has no labels; evaluate on val)" if split == "test" else ""
        raise DatasetError(NAME, root, f"unknown split {split!r} (have {', '.join(SPLITS)}){hint}", LAYOUT)
    d = find_dir(root)
    return list_split(d, split, read_wnids(d))


def load(root: str | Path, split: str, workers: int | None = None, **_: Any) -> ImageSet:
    paths, labels = check(root, split)
    d = find_dir(root)
    wnids = read_wnids(d)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        return (decode_fixed_size(paths, SIDE, NAME, LAYOUT, workers),
                torch.tensor(labels, dtype=torch.int64))

    images, label_t = cached_arrays(d, f"{NAME}-{split}", files_key(paths, ",".join(map(str, labels))), build)
    return ImageSet(images, label_t, len(wnids))
