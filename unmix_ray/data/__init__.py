"""Datasets, each read by a loader module named in its YAML (``configs/datasets/<name>.yaml``).

A dataset is one YAML file plus, unless an existing format fits, one loader module. The YAML's
``loader`` names the module (default ``unmix_ray.data.<name>``); any importable module will do, inside
this package or not (on a cluster: a module in the job's working directory). A loader module has:

- ``LAYOUT``: the on-disk layout, as text (every data error quotes it);
- ``load(root, split, **options) -> ImageSet``: one split, in memory, uint8 [N, C, H, W] at the
  configured ``image_size``, labels int64 [N] in [0, num_classes) (-1: unlabelled). ``options`` are
  ``workers`` (decode threads), ``image_size`` and the YAML's ``loader_options``;
- optionally ``check(root, split, **options)``: a cheap check (headers, sizes, file lists; no decoding)
  that raises ``DatasetError`` for what ``load`` would fail on: run by ``preflight`` before any
  cluster work, so a missing or truncated file is one message, not one failed trial per trial;
- optionally ``download(root)`` and ``present(root)``, used when the YAML says ``download: true``;
- optionally ``STREAMED = True`` and ``stream(root, splits, mode=..., image_size=..., crop_size=...,
  subset=..., seed=..., crop_scale=..., crop_ratio=...) -> (torch Dataset, num_classes)`` for data too
  big for memory (ImageNet). In ``pretrain`` mode its items may be two views [2, C, crop, crop], each
  cropped (``crop_scale``, ``crop_ratio`` of the dataset's ``augment``) from the whole image.

What a loader returns is checked against the config when it is loaded (dtype, channels, size,
labels), so a loader that returns floats or the wrong size fails at once, naming the dataset.
Ready-made formats: the six datasets' originals, and ``unmix_ray.data.npz`` (a ``.npz`` per split,
or one file split by a seeded stratified draw) for any small dataset with a YAML only.

Getting the data onto a node (``prepare(config)``, called by everything below):
  - ``source: s3://bucket/prefix`` (or an archive key) stages it into ``root`` once per node, resumable
    and verified (``unmix_ray.data.staging``); ``endpoint_url`` for S3-compatible stores.
  - ``download: true`` lets the loader fetch the data into ``root`` if it is missing there.
  - otherwise ``root`` must hold the files. Bad data raises ``DatasetError`` naming the dataset, the
    path and the layout expected, before any training starts.

Reading:
  - ``load_split(config, split) -> ImageSet`` and ``load_pretrain(config, seed)`` (every split of
    ``pretrain_splits``, seeded ``train_subset`` applied), for in-memory datasets.
  - ``image_loader(config, splits, batch_size, mode=..., seed=, rank=, world_size=)`` for any
    dataset: an iterable of sharded uint8 batches ``(images [B, C, S, S], labels [B])`` on the CPU
    (pinned when CUDA is present), with ``set_epoch(epoch)`` and ``len()`` (the same on every rank)::

        batches = image_loader(cfg, cfg.pretrain_splits, per_worker_batch, mode="pretrain", seed=seed,
                               rank=rank, world_size=world)
        for epoch in range(start, epochs):
            batches.set_epoch(epoch)
            for images, _ in batches:
                x0, x1 = augment(images.to(device)), augment(images.to(device))  # BatchAugment views

    ``mode="pretrain"``: shuffled, ``drop_last`` (even batches for Un-Mix), ``train_subset`` applied.
    ``mode="train"``: shuffled, ``drop_last``. ``mode="eval"``: in order, nothing dropped (the last
    shard wraps around to equal length on multiple ranks). In-memory datasets come back as stored in
    every mode; streamed ones are cropped for the mode in their DataLoader workers: in pretrain mode
    ImageNet's batches are view pairs [B, 2, C, crop, crop], which ``Pretrainer`` augments without
    cropping again (``augment(views[:, 0], crop=False)``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from unmix_ray.concurrency import file_lock
from unmix_ray.config import DatasetConfig
from unmix_ray.config.models import loader_contract
from unmix_ray.data.errors import DatasetError
from unmix_ray.data.images import default_workers
from unmix_ray.data.imageset import ImageSet
from unmix_ray.data.loader import MemoryBatches, StreamBatches

__all__ = ["MODES", "DatasetError", "ImageSet", "dataset_module", "image_loader", "is_streamed", "load_pretrain",
           "load_split", "preflight", "prepare", "splits_read"]

log = logging.getLogger(__name__)

MODES = ("pretrain", "train", "eval")


def dataset_module(config: DatasetConfig) -> ModuleType:
    """The loader module of ``config`` (see the module docstring)."""
    module, problem = loader_contract(config.loader_module)
    if problem:
        raise DatasetError(config.name, config.root, problem, "a module with LAYOUT and load() (unmix_ray.data)")
    return module


def is_streamed(config: DatasetConfig) -> bool:
    return bool(getattr(dataset_module(config), "STREAMED", False))


def prepare(config: DatasetConfig) -> Path:
    """Make ``config``'s data present under ``config.root`` (staging or downloading it) and return it."""
    root = Path(config.root).expanduser()
    if config.source:
        from unmix_ray.data.staging import stage

        return stage(config.source, root, endpoint_url=config.endpoint_url, dataset=config.name)
    module = dataset_module(config)
    present = getattr(module, "present", lambda _: False)
    if config.download and not present(root):
        with file_lock(root / ".unmix_stage" / "lock", what=f"downloading {config.name}"):
            if not present(root):  # another process of this node may have fetched it meanwhile
                log.info("%s: downloading into %s", config.name, root)
                module.download(root)
    return root


def _check(config: DatasetConfig, root: Path, split: str, data: ImageSet, layout: str) -> None:
    """The loader contract: uint8 [N, C, S, S] at the configured channels and size, int64 labels."""
    def fail(problem: str) -> None:
        raise DatasetError(config.name, root, f"split {split!r}: {problem} (loader {config.loader_module})", layout)

    images, labels = data.images, data.labels
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        fail(f"images are {kind}; the loader must return uint8 tensors [N, C, H, W] with values 0-255")
    if images.ndim != 4:
        fail(f"images have shape {tuple(images.shape)}; expected [N, C, H, W]")
    n, channels, height, width = images.shape
    if channels != config.channels:
        fail(f"images have {channels} channel(s); the config says {config.channels}")
    if (height, width) != (config.image_size, config.image_size):
        fail(f"images are {width}x{height}; the config's image_size says {config.image_size}x{config.image_size}")
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
        fail(f"labels must be int64 [{n}], got {getattr(labels, 'dtype', type(labels).__name__)} "
             f"{tuple(getattr(labels, 'shape', ()))}")
    if data.num_classes != config.num_classes:
        fail(f"has {data.num_classes} classes and {channels} channels; the config says {config.num_classes} and "
             f"{config.channels}")
    if n and (int(labels.min()) < -1 or int(labels.max()) >= config.num_classes):
        fail(f"labels span {int(labels.min())}..{int(labels.max())}, expected 0..{config.num_classes - 1} "
             "(-1 for unlabelled images)")
    if n and int(images[: min(n, 256)].max()) <= 16:
        log.warning("%s: split %r: the brightest pixel of the first images is %d; images are expected on 0-255",
                    config.name, split, int(images[: min(n, 256)].max()))


def splits_read(config: DatasetConfig) -> list[str]:
    """Every split a trial of ``config`` reads: pretraining, the kNN bank / probe training set, the test set."""
    return list(dict.fromkeys([*config.pretrain_splits, config.train_split, config.test_split]))


def preflight(config: DatasetConfig) -> list[str]:
    """Problems with the local files of every split a trial will read, found cheaply (the loader's
    ``check``: headers, sizes, file lists; nothing decoded), each problem once. Data that arrives by
    ``source`` (staged from S3) or ``download`` is checked where it is staged."""
    if config.source or config.download:
        return []
    module = dataset_module(config)
    root = Path(config.root).expanduser()
    check = getattr(module, "check", None)
    problems: list[str] = []
    for split in splits_read(config):
        try:
            if check is not None:
                check(root, split, dataset=config.name, **config.loader_options)
            elif not root.exists():
                raise DatasetError(config.name, root, "data root not found", module.LAYOUT)
        except DatasetError as e:
            if str(e) not in problems:
                problems.append(str(e))
    return problems


def load_split(config: DatasetConfig, split: str) -> ImageSet:
    root = prepare(config)
    module = dataset_module(config)
    data = module.load(root, split, workers=config.decode_workers, image_size=config.image_size,
                       dataset=config.name, num_classes=config.num_classes, **config.loader_options)
    _check(config, root, split, data, module.LAYOUT)
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
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    splits = [splits] if isinstance(splits, str) else list(splits)
    shuffle = mode != "eval" if shuffle is None else shuffle
    drop_last = mode != "eval" if drop_last is None else drop_last
    if subset is None and mode == "pretrain":
        subset = config.train_subset
    module = dataset_module(config)
    if not getattr(module, "STREAMED", False):
        data = ImageSet.concat([load_split(config, s) for s in splits]).subset(subset, seed)
        return MemoryBatches(data, batch_size, rank, world_size, seed, shuffle, drop_last)
    dataset, num_classes = module.stream(prepare(config), splits, mode=mode, image_size=config.image_size,
                                         crop_size=config.crop_size, subset=subset, seed=seed,
                                         crop_scale=config.augment.crop_scale, crop_ratio=config.augment.crop_ratio)
    if num_classes != config.num_classes:
        raise DatasetError(config.name, config.root, f"has {num_classes} classes; the config says "
                           f"{config.num_classes}", module.LAYOUT)
    requested = workers if workers is not None else config.decode_workers
    n_workers = 0 if requested == 0 else default_workers(requested)
    return StreamBatches(dataset, num_classes, batch_size, rank, world_size, seed, shuffle, drop_last,
                         n_workers)
