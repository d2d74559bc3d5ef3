"""The datasets: CIFAR-10/100, STL-10, Tiny ImageNet, ImageNet and Fashion-MNIST, from their original files.

Registry: ``DATASETS[name](root, split) -> ImageSet`` (one module per format, e.g. ``cifar10.py``);
``configs/datasets/<name>.yaml`` holds each dataset's splits, sizes, statistics and augmentation.

Getting the data onto a node (``prepare(config)``, called by everything below):
  - ``source: s3://bucket/prefix`` (or an archive key) stages it into ``root`` once per node, resumable
    and verified (``unmix_ray.data.staging``); ``endpoint_url`` for S3-compatible stores.
  - ``download: true`` lets torchvision fetch CIFAR-10/100 or STL-10 into ``root`` if it is missing.
  - otherwise ``root`` must hold the files (each module's ``LAYOUT`` says how). Bad data raises
    ``DatasetError`` naming the dataset, the path and the layout expected, before any training starts.

Images up to 96 px (all but ImageNet) are held in memory as uint8 [N, C, H, W]:
  - ``load_pretrain(config, seed) -> ImageSet``: every split of ``pretrain_splits`` (STL-10: train +
    unlabeled, whose labels are -1), seeded ``train_subset`` applied.
  - ``load_split(config, split) -> ImageSet``: one split (evaluation: ``config.train_split`` /
    ``config.test_split``; Tiny ImageNet's test split is ``val``).
  The training loop moves uint8 batches to the device and calls ``BatchAugment`` twice per batch.

Any dataset, ImageNet included (which only streams), as sharded uint8 batches:
  - ``image_loader(config, splits, batch_size, mode=..., seed=, rank=, world_size=)`` -> an iterable
    with ``set_epoch(epoch)`` and ``len()`` (batches per epoch, equal on every rank), yielding
    ``(images uint8 [B, C, S, S], labels int64 [B])`` on the CPU (pinned when CUDA is present)::

        batches = image_loader(cfg, cfg.pretrain_splits, per_worker_batch, mode="pretrain", seed=seed,
                               rank=ctx.get_world_rank(), world_size=ctx.get_world_size())
        for epoch in range(start, epochs):
            batches.set_epoch(epoch)
            for images, _ in batches:
                x = images.to(device, non_blocking=True)
                x0, x1 = augment(x), augment(x)        # BatchAugment: crop_size views

        test = image_loader(cfg, cfg.test_split, 256, mode="eval")  # in order, every image once
        for images, labels in test:
            feats = encoder(normalize(images.to(device), cfg.mean, cfg.std, cfg.crop_size))

    ``mode="pretrain"``: shuffled, ``drop_last`` (even batches for Un-Mix), ``train_subset`` applied;
    images at ``image_size`` (ImageNet: a random 256 square of the 256-shorter-side image).
    ``mode="train"``: shuffled, ``drop_last``; ImageNet: RandomResizedCrop 224 + flip in the workers
    (the linear-probe training transform). ``mode="eval"``: in order, nothing dropped (the last
    shard wraps around to equal length on multiple ranks); ImageNet: resize 256, centre crop 224.
    In-memory datasets come back as stored in every mode (``normalize(..., size=crop_size)`` resizes).
    ImageNet decodes in ``decode_workers`` DataLoader worker processes (forkserver, persistent);
    shard with rank/world_size here and do not pass the loader through ``prepare_data_loader``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from unmix_ray.config import DatasetConfig
from unmix_ray.data import cifar10, cifar100, fashion_mnist, imagenet, stl10, tiny_imagenet
from unmix_ray.data.errors import DatasetError
from unmix_ray.data.images import default_workers
from unmix_ray.data.imageset import ImageSet
from unmix_ray.data.loader import MemoryBatches, StreamBatches

__all__ = ["DATASETS", "STREAMED", "DatasetError", "ImageSet", "image_loader", "load_pretrain", "load_split",
           "prepare"]

log = logging.getLogger(__name__)

MODULES = {m.NAME: m for m in (cifar10, cifar100, stl10, tiny_imagenet, imagenet, fashion_mnist)}
DATASETS: dict[str, Callable[..., ImageSet]] = {name: m.load for name, m in MODULES.items()}
# Datasets too big for memory: image_loader streams them; load_split works only on small sets.
STREAMED = frozenset({"imagenet"})


def prepare(config: DatasetConfig) -> Path:
    """Make ``config``'s data present under ``config.root`` (staging or downloading it) and return it."""
    root = Path(config.root).expanduser()
    if config.source:
        from unmix_ray.data.staging import stage

        return stage(config.source, root, endpoint_url=config.endpoint_url, dataset=config.name)
    if config.download and not MODULES[config.name].present(root):
        _download(config, root)
    return root


def _download(config: DatasetConfig, root: Path) -> None:
    import torchvision

    from unmix_ray.data.staging import file_lock

    with file_lock(root / ".unmix_stage" / "lock", what=f"downloading {config.name}"):
        if MODULES[config.name].present(root):
            return  # another process of this node fetched it meanwhile
        log.info("%s: downloading with torchvision into %s", config.name, root)
        try:
            if config.name == "stl10":
                for split in ("train", "test", "unlabeled"):
                    torchvision.datasets.STL10(str(root), split=split, download=True)
            else:
                tv = torchvision.datasets
                cls = tv.CIFAR10 if config.name == "cifar10" else tv.CIFAR100
                for train in (True, False):
                    cls(str(root), train=train, download=True)
        except (OSError, RuntimeError) as e:  # URLError is an OSError
            raise DatasetError(config.name, root, f"torchvision download failed ({e}); without internet, "
                               "provide the files or an S3 source", MODULES[config.name].LAYOUT) from e


def _options(config: DatasetConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"workers": config.decode_workers}
    if config.name in STREAMED:
        opts["image_size"] = config.image_size
    return opts


def _check(config: DatasetConfig, root: Path, split: str, num_classes: int, channels: int) -> None:
    if num_classes != config.num_classes or channels != config.channels:
        raise DatasetError(
            config.name, root,
            f"split {split!r} has {num_classes} classes and {channels} channels; the config says "
            f"{config.num_classes} and {config.channels}", MODULES[config.name].LAYOUT,
        )


def load_split(config: DatasetConfig, split: str) -> ImageSet:
    root = prepare(config)
    data = DATASETS[config.name](root, split, **_options(config))
    _check(config, root, split, data.num_classes, data.images.shape[1])
    return data


def load_pretrain(config: DatasetConfig, seed: int) -> ImageSet:
    """The pretraining images (all of ``pretrain_splits``), subsetted as configured."""
    data = ImageSet.concat([load_split(config, s) for s in config.pretrain_splits])
    return data.subset(config.train_subset, seed)


def image_loader(config: DatasetConfig, splits: str | Sequence[str], batch_size: int, *,
                 mode: str = "pretrain", seed: int = 0, rank: int = 0, world_size: int = 1,
                 subset: int | None = None, workers: int | None = None, shuffle: bool | None = None,
                 drop_last: bool | None = None) -> MemoryBatches | StreamBatches:
    """Sharded uint8 batches of ``splits`` for any dataset (see the module docstring).

    ``subset``: a seeded random subset (default: ``train_subset`` in pretrain mode, else all).
    ``workers``: DataLoader processes for streamed datasets (default ``decode_workers``, else one per
    CPU up to 8). ``shuffle`` / ``drop_last`` default to True except in ``eval`` mode.
    """
    if mode not in imagenet.MODES:
        raise ValueError(f"mode must be one of {imagenet.MODES}, got {mode!r}")
    splits = [splits] if isinstance(splits, str) else list(splits)
    shuffle = mode != "eval" if shuffle is None else shuffle
    drop_last = mode != "eval" if drop_last is None else drop_last
    if subset is None and mode == "pretrain":
        subset = config.train_subset
    if config.name not in STREAMED:
        data = ImageSet.concat([load_split(config, s) for s in splits]).subset(subset, seed)
        return MemoryBatches(data, batch_size, rank, world_size, seed, shuffle, drop_last)
    import numpy as np
    import torch

    root = prepare(config)
    files, labels = [], []
    num_classes = 0
    for s in splits:
        folder, classes, f, lab = imagenet.scan(root, s)
        _check(config, root, s, len(classes), 3)
        num_classes = len(classes)
        prefix = f"{folder.name}/".encode()
        files.append(np.char.add(prefix, f))
        labels.append(lab)
    files_all, labels_all = np.concatenate(files), np.concatenate(labels)
    if subset is not None and subset < len(files_all):
        perm = torch.randperm(len(files_all), generator=torch.Generator().manual_seed(seed))
        keep = np.sort(perm[:subset].numpy())
        files_all, labels_all = files_all[keep], labels_all[keep]
    dataset = imagenet.ImageFolderStream(root, files_all, labels_all, mode, config.image_size,
                                         config.crop_size)
    requested = workers if workers is not None else config.decode_workers
    n_workers = 0 if requested == 0 else default_workers(requested)
    return StreamBatches(dataset, num_classes, batch_size, rank, world_size, seed, shuffle, drop_last,
                         n_workers)
