"""Sharded, seeded uint8 batches for any dataset: in memory, or streamed from JPEG folders.

``image_loader`` (re-exported by ``unmix_ray.data``) returns an object with ``set_epoch(epoch)``,
``len()`` (batches per epoch, the same on every rank) and iteration over ``(images, labels)``:
uint8 [B, C, S, S] and int64 [B], on the CPU (pinned when CUDA is available, for non_blocking copies).
"""

from __future__ import annotations

import math
import multiprocessing as mp
from collections.abc import Iterator

import numpy as np
import torch

from unmix_ray.data.imageset import ImageSet


def shard_indices(n: int, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool,
                  drop_last: bool) -> np.ndarray:
    """This rank's sample indices for ``epoch``: a seeded permutation split round-robin over ranks.

    Every rank gets the same count: the tail is dropped (``drop_last``) or padded by wrapping around,
    as ``DistributedSampler`` does, so all ranks take the same number of steps.
    """
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n))
    per_rank = n // world_size if drop_last else math.ceil(n / world_size)
    total = per_rank * world_size
    if total > n:
        order = np.concatenate([order, order[: total - n]])
    return order[rank:total:world_size]


class ShardSampler(torch.utils.data.Sampler[int]):
    def __init__(self, n: int, rank: int, world_size: int, seed: int, shuffle: bool, drop_last: bool):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.shuffle, self.drop_last, self.epoch = shuffle, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        idx = shard_indices(self.n, self.rank, self.world_size, self.seed, self.epoch, self.shuffle,
                            self.drop_last)
        return iter(idx.tolist())

    def __len__(self) -> int:
        return self.n // self.world_size if self.drop_last else math.ceil(self.n / self.world_size)


class MemoryBatches:
    """Batches of an in-memory ``ImageSet`` (indexing a uint8 tensor: no worker processes needed)."""

    def __init__(self, data: ImageSet, batch_size: int, rank: int, world_size: int, seed: int, shuffle: bool,
                 drop_last: bool):
        self.data, self.batch_size, self.drop_last = data, batch_size, drop_last
        self.sampler = ShardSampler(len(data), rank, world_size, seed, shuffle, drop_last)
        self.num_classes = data.num_classes

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(list(self.sampler))
        pin = torch.cuda.is_available()
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            images, labels = self.data.images[sel], self.data.labels[sel]
            yield (images.pin_memory(), labels.pin_memory()) if pin else (images, labels)


class StreamBatches:
    """Batches of a streamed ``Dataset`` through a torch DataLoader with persistent workers."""

    def __init__(self, dataset: torch.utils.data.Dataset, num_classes: int, batch_size: int, rank: int,
                 world_size: int, seed: int, shuffle: bool, drop_last: bool, workers: int):
        self.num_classes = num_classes
        self.sampler = ShardSampler(len(dataset), rank, world_size, seed, shuffle, drop_last)
        gen = torch.Generator().manual_seed(seed * 1000 + rank)  # the workers' base seed, per rank
        context = None
        if workers > 0:
            # Workers fork from a server that has imported torch and the decoder once, instead of each
            # importing them (seconds apiece); forking the training process itself is unsafe with CUDA.
            context = mp.get_context("forkserver")
            context.set_forkserver_preload(["torch", "torchvision", "unmix_ray.data.imagenet"])
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last, num_workers=workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0, generator=gen,
            prefetch_factor=4 if workers > 0 else None,
            multiprocessing_context=context,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)
