"""MoCo v1 (He et al., CVPR 2020) and v2 (Chen et al., arXiv 2003.04297) with Un-Mix.

Queries come from the online encoder (backbone + head), keys from a momentum encoder (no gradient)
whose weights follow the online ones: ``theta_k <- m theta_k + (1 - m) theta_q``. Negatives are a
queue of past keys. v1 and v2 differ only in their recipe (v2: an MLP head, T 0.2, cosine lr, blur).

Un-Mix, as the authors did it: the clean key ``k`` of the second view is the positive of the
clean query ``q`` of the first view *and* of the mixed queries; the mixed batch has its own forward
pass through the online encoder, and its reversed copy is ``flip(q_mix)``:

    CE(q, k) + lam CE(q_mix, k) + (1 - lam) CE(flip(q_mix), k)

This is ``unmix_objective`` with outputs typed by role: the first view yields a ``Query``, the
second a ``Key``, the mixture a ``Query``, and the base loss ``L(a, b)`` is InfoNCE of whichever
argument is the query against whichever is the key. All terms of one step share the same negatives
(the queue as it was before the step). Only clean keys are enqueued; every rank enqueues the keys
of every rank (all-gathered, in rank order), so the queue is the same on all ranks.

``symmetric`` adds the terms with the views' roles swapped: queries of the second view against keys
of the first. How the swapped half treats the mixture is ``symmetric_mix``:

- ``view0`` (default; the authors' ``unmix_c10.py``): the *same* mixture of the first view in both
  halves, its positives being the keys of both views (no mixture of the second view is made):

      CE(q0, k1) + CE(q1, k0) + lam CE(q_mix, k1) + (1 - lam) CE(flip(q_mix), k1)
                              + lam CE(q_mix, k0) + (1 - lam) CE(flip(q_mix), k0)

- ``both_views``: the swapped half mixes the second view with the same draw (same lam, same box) and
  pairs that mixture with the first view's keys, so that no positive is the very view that was mixed:
  ``... + lam CE(q_mix1, k0) + (1 - lam) CE(flip(q_mix1), k0)`` with ``q_mix1`` the query of the mixed
  second view (one more forward pass).

Keys of both views are enqueued.

Keys use shuffling BN across workers (``shuffle_bn``; see ``collectives.shuffled_forward``).
``bn_splits`` > 1 is the authors' CIFAR split BN (``unmix_ray.norm.SplitBatchNorm``): each worker's
BatchNorm2d layers normalise interleaved sub-batches, and keys are shuffled within the worker too.
kNN evaluates the normalised head output (``knn_head``), as the authors' monitor did. The
momentum encoder moves once per optimiser step, in ``after_step``: the same as MoCo's update at the
start of the next forward, since nothing reads the key encoder in between.

The shuffle's permutations come from a generator seeded from (``shuffle_seed``, ``shuffle_count``):
a seed drawn at construction from torch's generator (seeded alike on every rank, as the weights are)
and the number of permutations drawn so far. Both are buffers, so a checkpoint carries them and a run
resumed from it shuffles exactly as the uninterrupted run would have.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from unmix_ray.collectives import all_gather_no_grad, is_distributed, shuffled_forward
from unmix_ray.config import Model
from unmix_ray.losses.info_nce import info_nce
from unmix_ray.methods.base import SSLMethod, ema_update, frozen_copy
from unmix_ray.models import mlp
from unmix_ray.norm import split_batchnorm
from unmix_ray.unmix import Mixture, UnmixLoss, cutmix, mixup, unmix_objective


class MoCoParams(Model):
    proj_hidden: int | None = Field(None, ge=1)  # null: one linear layer (v1); an int: Linear-ReLU-Linear (v2)
    proj_dim: int = Field(128, ge=1)
    temperature: float = Field(0.1, gt=0.0)
    queue_size: int = Field(4096, ge=1)
    momentum: float = Field(0.99, ge=0.0, le=1.0)
    symmetric: bool = False
    symmetric_mix: Literal["view0", "both_views"] = "view0"  # the swapped half's mixture (module docstring)
    shuffle_bn: bool = True
    # BatchNorm2d over this many interleaved sub-batches of each worker's batch (the Un-Mix MoCo CIFAR
    # code's 8, imitating 8 GPUs on one); 1: plain BN. See unmix_ray.norm.SplitBatchNorm.
    bn_splits: int = Field(1, ge=1)


class MoCoV1Params(MoCoParams):
    """The Un-Mix MoCo CIFAR recipe (a v1 model: linear head)."""


class MoCoV2Params(MoCoParams):
    """The MoCo v2 ImageNet recipe: MLP head 2048-2048-128, T 0.2, queue 65536, m 0.999."""

    proj_hidden: int | None = Field(2048, ge=1)
    temperature: float = Field(0.2, gt=0.0)
    queue_size: int = Field(65536, ge=1)
    momentum: float = Field(0.999, ge=0.0, le=1.0)


class Query(NamedTuple):
    q: torch.Tensor  # L2-normalised online embedding


class Key(NamedTuple):
    k: torch.Tensor  # L2-normalised momentum embedding (no gradient)


def same_mixture(mixture: Mixture, x: torch.Tensor) -> torch.Tensor:
    """Apply ``mixture``'s draw (its lam for mixup, its box for CutMix) to another batch ``x``."""
    if mixture.kind == "mixup":
        return mixup(x, mixture.lam)
    return cutmix(x, mixture.box)[0]


class MoCo(SSLMethod):
    Params = MoCoParams
    global_bn = False  # keys use shuffle-BN instead

    def __init__(self, backbone: nn.Module, params: MoCoParams):
        super().__init__(split_batchnorm(backbone, params.bn_splits), params)
        hidden = [] if params.proj_hidden is None else [params.proj_hidden]
        self.projector = mlp([backbone.feature_dim, *hidden, params.proj_dim], batch_norm=False)
        self.key_backbone = frozen_copy(backbone)
        self.key_projector = frozen_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(params.queue_size, params.proj_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("shuffle_seed", torch.randint(2**62, ()))
        self.register_buffer("shuffle_count", torch.zeros((), dtype=torch.long))
        # Host copies of (shuffle_seed, shuffle_count), so that seeding a draw reads nothing from the device.
        self._shuffle_state = (int(self.shuffle_seed), 0)

    def outputs(self, x: torch.Tensor) -> Query:
        return Query(F.normalize(self.projector(self.backbone(x)), dim=1))

    def _key_encoder(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projector(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> Key:
        if not self.params.shuffle_bn:
            return Key(self._key_encoder(x))
        local = self.params.bn_splits > 1
        generator = self._shuffle_generator(x.device) if local or is_distributed() else None  # None: no draw
        return Key(shuffled_forward(self._key_encoder, x, local=local, generator=generator))

    @torch.compiler.disable  # host-side state: under torch.compile a graph break, not a recompilation per step
    def _shuffle_generator(self, device: torch.device) -> torch.Generator:
        """The generator of the next key-shuffle permutation, seeded from (seed, permutations drawn so far)."""
        seed, count = self._shuffle_state
        self._shuffle_state = (seed, count + 1)
        self.shuffle_count.fill_(count + 1)
        return torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, count]).generate_state(1)[0]))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in ("shuffle_seed", "shuffle_count"):  # checkpoints written before the shuffle was seeded
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._shuffle_state = (int(self.shuffle_seed), int(self.shuffle_count))  # one device read, at load

    def loss(self, a: Query | Key, b: Query | Key, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE of the query (either argument) against the key (the other one) and ``negatives``
        (default: the queue as it is now)."""
        query, key = (a, b) if isinstance(a, Query) else (b, a)
        if not (isinstance(query, Query) and isinstance(key, Key)):
            raise TypeError("MoCo's loss pairs one Query with one Key")
        negatives = self.queue if negatives is None else negatives
        return info_nce(query.q, key.k, negatives, self.params.temperature)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, mixture: Mixture | None = None) -> UnmixLoss:
        # One snapshot of the queue for every term; the in-place enqueue below must not touch it.
        loss = partial(self.loss, negatives=self.queue.clone())
        lam = mixture.lam if mixture is not None else 1.0
        k1 = self.keys(x1)
        q_mix = self.outputs(mixture.images) if mixture is not None else None
        out = unmix_objective(loss, self.outputs(x0), k1, q_mix, lam)
        keys = [k1.k]
        if self.params.symmetric:
            k0 = self.keys(x0)
            if mixture is not None and self.params.symmetric_mix == "both_views":
                q_mix = self.outputs(same_mixture(mixture, x1))
            swapped = unmix_objective(loss, self.outputs(x1), k0, q_mix, lam)
            out = UnmixLoss(out.total + swapped.total, out.clean + swapped.clean, out.mixed + swapped.mixed)
            keys.append(k0.k)
        self.enqueue(torch.cat(keys))
        return out

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write every rank's ``keys`` (rank order) at the pointer, wrapping; the queue keeps the last
        ``queue_size`` keys, the oldest at the pointer."""
        keys = all_gather_no_grad(keys)
        size, n = self.queue.shape[0], keys.shape[0]
        ptr = self.queue_ptr
        if n > size:  # only the newest ``size`` keys survive
            keys, ptr = keys[-size:], ptr + (n - size)
            n = size
        idx = (ptr + torch.arange(n, device=keys.device)) % size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((ptr + n) % size)

    def knn_head(self, features: torch.Tensor) -> torch.Tensor:
        # The authors' kNN monitor reads the query encoder's output: the normalised head embedding.
        return F.normalize(self.projector(features), dim=1)

    @property
    def knn_representation(self) -> str:
        return f"the frozen query encoder's L2-normalised {self.params.proj_dim}-d head output"

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        ema_update(self.key_backbone, self.backbone, self.params.momentum)
        ema_update(self.key_projector, self.projector, self.params.momentum)


class MoCoV1(MoCo):
    Params = MoCoV1Params


class MoCoV2(MoCo):
    Params = MoCoV2Params
