"""Frozen features of an encoder: the evaluation transform, extraction in batches, and extraction of
a dataset split sharded over the ranks of a training run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from unmix_ray.augment import normalize
from unmix_ray.collectives import gather_shards, rank, world_size
from unmix_ray.config import DatasetConfig
from unmix_ray.data import image_loader


def freeze(module: torch.nn.Module) -> Callable[[], None]:
    """Put ``module`` in eval mode (BN uses its running statistics, so a sample's features do not depend
    on its batch) with no gradients; return the function that restores its mode and flags."""
    was_training = module.training
    flags = [(p, p.requires_grad) for p in module.parameters()]
    module.eval()
    for p, _ in flags:
        p.requires_grad_(False)

    def restore() -> None:
        for p, flag in flags:
            p.requires_grad_(flag)
        module.train(was_training)

    return restore


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``freeze`` for the duration of a ``with`` block."""
    restore = freeze(module)
    try:
        yield module
    finally:
        restore()


class Features(torch.nn.Module):
    """A method's ``features`` (the representation evaluated) as a module of its own."""

    def __init__(self, method: torch.nn.Module):
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.features(x)


def eval_view(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], size: int,
              resize: int | None = None) -> torch.Tensor:
    """The test transform: uint8 -> normalised float at ``size``; with ``resize``, the shorter side is
    resized to ``resize`` and the centre ``size`` x ``size`` is kept (ImageNet's 256 / 224)."""
    if resize is None:
        return normalize(images, mean, std, size)
    x = images.float().div_(255.0)
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear",
                      align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size]
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def extract_features(encoder: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     mean: tuple[float, ...], std: tuple[float, ...], size: int, device: torch.device,
                     batch_size: int = 1024, resize: int | None = None) -> torch.Tensor:
    """Features of uint8 ``images`` (no augmentation), float32 [N, D] on ``device``."""
    out = [encoder(eval_view(images[i:i + batch_size].to(device), mean, std, size, resize)).float()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def split_features(encoder: Callable[[torch.Tensor], torch.Tensor], ds: DatasetConfig, split: str,
                   subset: int | None, seed: int, device: torch.device,
                   batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen features and labels of ``split`` (a seeded ``subset``), in dataset order, on ``device``.

    Every rank of a training run extracts its own shard (streamed datasets such as ImageNet through
    their DataLoader workers) and the shards are gathered on every rank, so the work is spread over
    the workers and all ranks must call this together."""
    loader = image_loader(ds, split, batch_size, mode="eval", seed=seed, rank=rank(), world_size=world_size(),
                          subset=subset)
    feats, labels = [], []
    for images, y in loader:
        feats.append(encoder(eval_view(images.to(device, non_blocking=True), ds.mean, ds.std,
                                       ds.crop_size)).float())
        labels.append(y.to(device))
    n = loader.sampler.n
    return gather_shards(torch.cat(feats), n), gather_shards(torch.cat(labels), n)
