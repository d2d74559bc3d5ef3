"""Every distributed helper of the project, in one place; each is the identity on a single process.

Gradients flow through ``gather_with_grad`` and ``all_reduce_with_grad`` only (global-batch negatives,
global BatchNorm statistics); the other helpers are for tensors that carry none: momentum keys,
Sinkhorn sums, shuffle permutations, loss sums, evaluation features, BatchNorm running statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_gather, all_reduce


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` concatenated (gradients flow back to each owner) and this rank's offset."""
    if not is_distributed():
        return x, 0
    return torch.cat(all_gather(x), dim=0), dist.get_rank() * x.shape[0]


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks, differentiable: each rank's ``x`` receives the sum of every rank's
    gradient of the result (the gradient of the sum of the ranks' losses)."""
    if not is_distributed():
        return x
    return all_reduce(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated along dim 0, in rank order (all ranks must pass equal shapes)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``x``."""
    if world_size() > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks; returns ``x``."""
    if world_size() > 1:
        dist.all_reduce(x)
        x /= world_size()
    return x


@torch.no_grad()
def average_buffers(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its mean over ranks, in place: one all-reduce per dtype and device.

    For state that is not kept identical by construction, such as BatchNorm running statistics, which
    each rank updates from its own batches: afterwards every rank holds the same values."""
    if world_size() == 1:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        if not t.is_floating_point():
            raise TypeError(f"average_buffers averages floating-point tensors, got {t.dtype}")
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world_size()
        for t, mean in zip(group, flat.split([t.numel() for t in group]), strict=True):
            t.copy_(mean.view_as(t))


@torch.no_grad()
def max_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """In-place maximum over ranks; returns ``x``."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


@torch.no_grad()
def gather_shards(x: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of a dataset sharded round-robin over ranks (rank r holds items r, r + W, ..., the last
    shard padded by wrapping around), back in dataset order on every rank, padding dropped."""
    if world_size() == 1:
        return x[:n]
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).flatten(0, 1)[:n]


@torch.no_grad()
def sum_shards(x: torch.Tensor, n: int) -> torch.Tensor:
    """The sum over the ``n`` items of a dataset sharded round-robin over ranks (as ``gather_shards``
    takes them) of their rows in ``x``, this rank's shard: rows past the end of the dataset (the
    wrapped padding of the last shard) are not counted. The same on every rank."""
    index = rank() + world_size() * torch.arange(x.shape[0], device=x.device)
    return all_reduce_sum(x[index < n].sum(0))


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` when several ranks train it, else ``module``:
    every backward pass then leaves each rank with the mean of the ranks' gradients, so equal local
    batches train it as one global batch would."""
    if not is_distributed():
        return module
    return torch.nn.parallel.DistributedDataParallel(module)


@torch.no_grad()
def shuffled_forward(encoder: torch.nn.Module, x: torch.Tensor, local: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``encoder(x)`` computed on a random permutation of the global batch, returned in ``x``'s order.

    Shuffling BN (He et al., MoCo, CVPR 2020): each rank's BatchNorm then normalises keys with the
    statistics of samples drawn from every rank, so a query and its positive key never share batch
    statistics (which would leak a shortcut). With one process, plain BN already sees the whole batch
    and a permutation changes nothing, so the encoder runs on ``x`` directly, unless ``local``: split
    BN (``unmix_ray.norm.SplitBatchNorm``) normalises sub-batches of one process, and the permutation
    keeps a key out of its query's split. Local batches must be of equal size (drop_last loaders).

    The permutation is drawn from ``generator`` (on ``x``'s device; default: torch's global one), rank
    0's draw being broadcast to every rank. A generator seeded from the training step makes the draw
    reproducible, so a run resumed from a checkpoint shuffles as the uninterrupted run did.
    """
    n_ranks = world_size()
    if n_ranks == 1:
        if not local:
            return encoder(x)
        perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
        return encoder(x[perm])[torch.argsort(perm)]
    x_all = all_gather_no_grad(x)
    perm = torch.randperm(x_all.shape[0], generator=generator, device=x.device)
    dist.broadcast(perm, src=0)
    mine = perm.view(n_ranks, -1)[rank()]
    out_all = all_gather_no_grad(encoder(x_all[mine]))
    restore = torch.argsort(perm).view(n_ranks, -1)[rank()]
    return out_all[restore]
