"""ImageNet (ILSVRC-2012) from its JPEG folders: 1000 classes, 1.28M train / 50k val images.

Too big for memory, so training streams it: ``ImageFolderStream`` is a torch ``Dataset`` over the
file list that reads, decodes (``torchvision.io.decode_jpeg``) and crops each image to a fixed-size
uint8 tensor inside DataLoader worker processes; ``unmix_ray.data.image_loader`` wraps it in a
sharded, seeded loader. The crop depends on the mode:

- ``pretrain``: two views per image, each its own RandomResizedCrop of the *whole* decoded image to
  ``crop_size`` (224; scale and ratio from the dataset's ``augment`` config), as MoCo v2's loader
  crops each view; item ``[2, 3, crop, crop]``. ``BatchAugment(crop=False)`` then applies the rest of
  the recipe (flip, jitter, grayscale, blur) on the device.
- ``train`` (supervised / linear-probe training): RandomResizedCrop to ``crop_size`` (scale
  0.08-1) and a random horizontal flip.
- ``eval``: shorter side resized to ``image_size``, centre crop ``crop_size`` (the 256 / 224 protocol).

``load(root, split)`` decodes a split into memory (``eval`` geometry at ``image_size``) for small
sets only: a subset, or the test fixtures; beyond ``MAX_IN_MEMORY`` images it refuses.
Class indices follow the sorted WordNet ids of the train folders.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from unmix_ray.concurrency import run_parallel
from unmix_ray.data.errors import DatasetError
from unmix_ray.data.images import cached_arrays, decode_one, default_workers, files_key, read_bytes
from unmix_ray.data.imageset import ImageSet

NAME = "imagenet"
STREAMED = True  # unmix_ray.data.image_loader streams it through ``stream``
SPLITS = ("train", "val")
EXTENSIONS = (".jpeg", ".jpg", ".png")
MAX_IN_MEMORY = 20_000  # images; 256x256 RGB is 196 kB each
Mode = Literal["pretrain", "train", "eval"]
MODES = ("pretrain", "train", "eval")
LAYOUT = """<root>/train/<wnid>/*.JPEG   one folder per class (1000), e.g. n01440764/n01440764_10026.JPEG
<root>/val/<wnid>/*.JPEG     the 50000 validation images sorted into the same class folders
                             (as the usual valprep.sh does; a flat val/ folder is not supported)"""


def scan(root: str | Path, split: str) -> tuple[Path, list[str], np.ndarray, np.ndarray]:
    """(split folder, class ids, relative file paths as bytes, labels) for ``split``."""
    root = Path(root).expanduser()
    if split not in SPLITS:
        raise DatasetError(NAME, root, f"unknown split {split!r} (have {', '.join(SPLITS)})", LAYOUT)
    if not root.is_dir():
        raise DatasetError(NAME, root, "data root not found", LAYOUT)
    classes = _class_dirs(root / "train")
    if not classes:
        raise DatasetError(NAME, root / "train", "no class folders with images", LAYOUT)
    folder = root / split
    if split == "train":
        present = classes
    else:
        present = _class_dirs(folder)
        if not present:
            loose = folder.is_dir() and any(e.is_file() for e in os.scandir(folder))
            problem = ("images directly in val/, not in class folders" if loose
                       else "no class folders with images")
            raise DatasetError(NAME, folder, problem, LAYOUT)
        unknown = sorted(set(present) - set(classes))
        if unknown:
            raise DatasetError(NAME, folder / unknown[0], f"{len(unknown)} val class(es) not among the train "
                               f"classes, e.g. {unknown[0]}", LAYOUT)
    index = {c: i for i, c in enumerate(classes)}
    files: list[bytes] = []
    labels: list[int] = []
    for c in present:
        names = sorted(e.name for e in os.scandir(folder / c)
                       if e.is_file() and e.name.lower().endswith(EXTENSIONS))
        files += [f"{c}/{n}".encode() for n in names]
        labels += [index[c]] * len(names)
    return folder, classes, np.array(files, dtype=bytes), np.array(labels, dtype=np.int16)


def check(root: str | Path, split: str, **_: Any) -> None:
    """What ``load`` and ``stream`` need, checked cheaply: the class folders and their files listed,
    nothing decoded."""
    scan(root, split)


def _class_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    out = []
    for e in os.scandir(folder):
        if e.is_dir() and not e.name.startswith("."):
            with os.scandir(e.path) as it:
                if any(f.name.lower().endswith(EXTENSIONS) for f in it):
                    out.append(e.name)
    return sorted(out)


# ---- per-image geometry (uint8 [3, H, W] -> uint8 [3, S, S]) ---------------------------------------------

def resize_shorter(img: torch.Tensor, size: int) -> torch.Tensor:
    return TF.resize(img, [size], antialias=True)


Box = tuple[int, int, int, int]  # top, left, height, width in pixels of the decoded image


def pretrain_views(img: torch.Tensor, crop_size: int, scale: tuple[float, float] = (0.2, 1.0),
                   ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, list[Box]]:
    """Two views [2, 3, crop, crop] of ``img``, each resized from its own RandomResizedCrop box of the
    whole image (torchvision's draw), and the two boxes. Unflipped: the flip is BatchAugment's."""
    boxes = [tuple(RandomResizedCrop.get_params(img, list(scale), list(ratio))) for _ in range(2)]
    views = [TF.resized_crop(img, *box, [crop_size, crop_size], antialias=True) for box in boxes]
    return torch.stack(views), boxes


def train_view(img: torch.Tensor, crop_size: int, scale: tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:
    top, left, h, w = RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
    out = TF.resized_crop(img, top, left, h, w, [crop_size, crop_size], antialias=True)
    return out.flip(-1) if torch.rand(()) < 0.5 else out


def eval_view(img: torch.Tensor, image_size: int, crop_size: int) -> torch.Tensor:
    return TF.center_crop(resize_shorter(img, image_size), [crop_size, crop_size])


class ImageFolderStream(torch.utils.data.Dataset):
    """Item i: (uint8 [3, S, S], label), decoded from ``folder / files[i]`` and cropped for ``mode``
    (``pretrain``: two views, uint8 [2, 3, S, S], cropped with ``crop_scale`` and ``crop_ratio``).

    Holds the file list as one numpy bytes array, so it pickles cheaply into worker processes.
    """

    def __init__(self, folder: str | Path, files: np.ndarray, labels: np.ndarray, mode: Mode,
                 image_size: int, crop_size: int, crop_scale: tuple[float, float] = (0.2, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.folder, self.files, self.labels = str(folder), files, labels
        self.mode, self.image_size, self.crop_size = mode, image_size, crop_size
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = Path(self.folder) / self.files[i].decode()
        img = decode_one(read_bytes(path, NAME, LAYOUT), path, NAME, LAYOUT)
        if self.mode == "pretrain":
            img = pretrain_views(img, self.crop_size, self.crop_scale, self.crop_ratio)[0]
        elif self.mode == "train":
            img = train_view(img, self.crop_size)
        else:
            img = eval_view(img, self.image_size, self.crop_size)
        return img, int(self.labels[i])


def load(root: str | Path, split: str, workers: int | None = None, image_size: int = 256,
         max_images: int = MAX_IN_MEMORY, **_: Any) -> ImageSet:
    """A split decoded into memory: shorter side ``image_size``, centre square. Small sets only."""
    folder, classes, files, labels = scan(root, split)
    if len(files) > max_images:
        raise DatasetError(NAME, folder, f"{len(files)} images is more than {max_images} to hold in memory; "
                           "stream it with unmix_ray.data.image_loader", LAYOUT)
    paths = [folder / f.decode() for f in files]
    data = ImageFolderStream(folder, files, labels, "eval", image_size, image_size)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(len(files), 3, image_size, image_size, dtype=torch.uint8)
        n = default_workers(workers)
        step = math.ceil(len(files) / n) if len(files) else 1

        def run(start: int) -> None:
            for i in range(start, min(start + step, len(files))):
                out[i] = data[i][0]

        run_parallel(run, range(0, len(files), step), n)
        return out, torch.from_numpy(labels.astype(np.int64))

    images, label_t = cached_arrays(folder.parent, f"{NAME}-{split}-{image_size}", files_key(paths), build)
    return ImageSet(images, label_t, len(classes))


def stream(root: str | Path, splits: list[str], *, mode: Mode, image_size: int, crop_size: int,
           subset: int | None = None, seed: int = 0, crop_scale: tuple[float, float] = (0.2, 1.0),
           crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), **_: Any) -> tuple[ImageFolderStream, int]:
    """The files of ``splits`` as one streamed dataset (a seeded ``subset`` of them) and the class count;
    ``crop_scale`` and ``crop_ratio`` are the pretraining views' RandomResizedCrop's."""
    files, labels = [], []
    num_classes = 0
    for s in splits:
        folder, classes, f, lab = scan(root, s)
        num_classes = len(classes)
        files.append(np.char.add(f"{folder.name}/".encode(), f))
        labels.append(lab)
    files_all, labels_all = np.concatenate(files), np.concatenate(labels)
    if subset is not None and subset < len(files_all):
        perm = torch.randperm(len(files_all), generator=torch.Generator().manual_seed(seed))
        keep = np.sort(perm[:subset].numpy())
        files_all, labels_all = files_all[keep], labels_all[keep]
    data = ImageFolderStream(Path(root).expanduser(), files_all, labels_all, mode, image_size, crop_size,
                             crop_scale, crop_ratio)
    return data, num_classes
