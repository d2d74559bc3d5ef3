"""Two gloo workers (torch.multiprocessing, no Ray): the cross-worker parts of the methods.

Each test forks two processes on the loopback; a failed assertion in either one fails the test.
"""

from __future__ import annotations

import copy
import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unmix_ray.collectives import all_gather_no_grad, average_buffers, shuffled_forward
from unmix_ray.config import CONFIG_DIR, DatasetConfig, MethodConfig, build
from unmix_ray.data import load_split
from unmix_ray.evaluation.features import Features, extract_features, frozen, split_features
from unmix_ray.losses.nt_xent import nt_xent
from unmix_ray.losses.swav import sinkhorn
from unmix_ray.methods import build_method
from unmix_ray.models import NarrowResNet
from unmix_ray.norm import GlobalBatchNorm, global_batchnorm, running_stats
from unmix_ray.unmix import Mixture, mixup

from .fixtures import write_fixture

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args) -> None:
    # Forked, not spawned: a spawned child imports torch and this module again (seconds per test); the
    # parent has no process group and one intra-op thread (tests/conftest.py), so a fork is safe.
    mp.start_processes(_entry, args=(fn, free_port(), args), nprocs=WORLD, join=True, start_method="fork")


def _entry(rank: int, fn, port: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _same_on_all_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


# ---------------------------------------------------------------- SimCLR negatives, SwAV Sinkhorn


def _losses_worker(rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    n_local, dim = 4, 6
    x0_all, x1_all = (torch.randn(WORLD * n_local, 5, generator=g) for _ in range(2))
    torch.manual_seed(1)
    layer = nn.Linear(5, dim)
    reference = nn.Linear(5, dim)
    reference.load_state_dict(layer.state_dict())

    # One process, the concatenated global batch.
    ref_loss = nt_xent(reference(x0_all), reference(x1_all), 0.5, gather=False)
    ref_loss.backward()

    # Two workers, each its own half, negatives gathered with gradients; DDP averages gradients.
    model = DistributedDataParallel(layer)
    mine = slice(rank * n_local, (rank + 1) * n_local)
    loss = nt_xent(model(x0_all[mine]), model(x1_all[mine]), 0.5, gather=True)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= WORLD
    torch.testing.assert_close(mean_loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
    for p, q in zip(layer.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    # Without gathering, each worker only sees its own negatives: the loss differs.
    local = nt_xent(layer(x0_all[mine]), layer(x1_all[mine]), 0.5, gather=False).detach()
    dist.all_reduce(local)
    assert not torch.allclose(local / WORLD, ref_loss.detach(), rtol=1e-3)

    # Sinkhorn over the global batch equals Sinkhorn on the concatenated scores.
    z = F.normalize(torch.randn(WORLD * 6, 8, generator=g), dim=1)
    scores_all = z @ F.normalize(torch.randn(5, 8, generator=g), dim=1).T
    mine = slice(rank * 6, (rank + 1) * 6)
    codes = sinkhorn(scores_all[mine], eps=0.05, iters=3)
    torch.testing.assert_close(codes, sinkhorn(scores_all, 0.05, 3)[mine], rtol=1e-5, atol=1e-7)
    # Prototype marginals hold over the global batch, not per worker.
    col = all_gather_no_grad(sinkhorn(scores_all[mine], 0.05, 50)).sum(dim=0)
    torch.testing.assert_close(col, torch.full((5,), WORLD * 6 / 5), rtol=1e-3, atol=1e-3)


def test_gathered_negatives_and_global_sinkhorn_match_one_process():
    spawn(_losses_worker)


# ---------------------------------------------------------------- MoCo across workers


class Flat(nn.Module):
    """A per-sample encoder (no BatchNorm): its output for a sample ignores the rest of the batch."""

    feature_dim = 12

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 12)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _bn_encoder() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5), nn.BatchNorm1d(5)).train()


SHUFFLE_SEED = 7


def _shuffle_bn_worker(rank: int) -> None:
    n_local = 6
    x_all = torch.randn(WORLD * n_local, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * 2
    x_all[n_local:] += 1  # rank 1's samples differ in distribution: per-rank statistics differ
    mine = slice(rank * n_local, (rank + 1) * n_local)
    enc = _bn_encoder()

    # By hand: permute the global batch with the seeded draw, give rank r the r-th chunk, encode each
    # chunk with its own BatchNorm statistics (train mode), undo the permutation, take this rank's rows.
    reference = copy.deepcopy(enc)
    perm = torch.randperm(WORLD * n_local, generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    per_chunk = torch.cat([reference(chunk) for chunk in x_all[perm].split(n_local)])
    expected = per_chunk[torch.argsort(perm)][mine]

    # Rank 1's generator is seeded otherwise: rank 0's draw is the one every rank uses.
    generator = torch.Generator().manual_seed(SHUFFLE_SEED + rank)
    keys = shuffled_forward(enc, x_all[mine], generator=generator)
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-6)
    # Shuffling matters with BatchNorm: the plain per-rank forward gives other keys.
    with torch.no_grad():
        unshuffled = reference(x_all[mine])
    assert (keys - unshuffled).abs().max() > 0.1


def test_shuffle_bn_encodes_rank_chunks_of_a_seeded_global_permutation():
    spawn(_shuffle_bn_worker)


def _moco_worker(rank: int) -> None:
    # Shuffled-BN keys come back in the caller's order: with a per-sample encoder they equal the
    # keys computed directly.
    torch.manual_seed(0)
    enc = Flat()
    x = torch.randn(6, 3, 8, 8) + rank
    torch.testing.assert_close(shuffled_forward(enc, x), enc(x))

    # Every rank enqueues every rank's clean keys, so the queue is identical on all ranks.
    torch.manual_seed(0)  # same initial weights and queue on both ranks
    params = {"proj_dim": 8, "queue_size": 20, "momentum": 0.9}
    method = build_method(MethodConfig(name="moco_v1", params=params), NarrowResNet(3, 4)).train()
    assert _same_on_all_ranks(method.queue)
    # broadcast_buffers=False: DDP must not paper over a queue that diverged between ranks.
    model = DistributedDataParallel(method, broadcast_buffers=False)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data and its own mixture
    for step in range(4):
        x0, x1 = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
        lam = float(torch.rand((), generator=g))
        mix = Mixture(mixup(x0, lam), lam, "mixup")
        out = model(x0, x1, mix)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        method.after_step(step / 4)
        assert torch.isfinite(out.total)
        assert int(method.queue_ptr) == (step + 1) * 4 * WORLD % 20
        assert _same_on_all_ranks(method.queue) and _same_on_all_ranks(method.queue_ptr)
    for p in list(method.parameters()):
        assert _same_on_all_ranks(p.detach())

    # The block just written is rank 0's keys, then rank 1's.
    torch.manual_seed(0)
    flat = build_method(MethodConfig(name="moco_v1", params={"proj_dim": 8, "queue_size": 20}), Flat()).train()
    x0, x1 = torch.randn(4, 3, 8, 8) + rank, torch.randn(4, 3, 8, 8) - rank
    own = flat._key_encoder(x1)
    flat(x0, x1, None)
    expected = all_gather_no_grad(own)
    torch.testing.assert_close(flat.queue[:8], expected)
    assert not torch.allclose(expected[:4], expected[4:])


def test_moco_queue_is_identical_on_all_workers():
    spawn(_moco_worker)


# ---------------------------------------------------------------- global BatchNorm (train.sync_bn)


SIMCLR = {"proj_hidden": 16, "proj_dim": 8}


def _simclr(gather: bool) -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank and for the reference
    return build_method(MethodConfig(name="simclr", params=SIMCLR | {"gather_negatives": gather}),
                        NarrowResNet(3, 4)).train()


def _global_bn_worker(rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    n_local = 6
    x0_all, x1_all = (torch.randn(WORLD * n_local, 3, 16, 16, generator=g) * 2 + 1 for _ in range(2))
    mine = slice(rank * n_local, (rank + 1) * n_local)

    # One process, one BN over the concatenated global batch (negatives: the whole batch).
    reference = _simclr(gather=False)
    ref_loss = reference(x0_all, x1_all, None).total
    ref_loss.backward()

    for sync in (True, False):
        method = _simclr(gather=True)
        if sync:
            method = global_batchnorm(method, torch.device("cpu"))
            assert any(isinstance(m, GlobalBatchNorm) for m in method.modules())
        model = DistributedDataParallel(method, broadcast_buffers=False)
        loss = model(x0_all[mine], x1_all[mine], None).total
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        grads = [(p.grad, q.grad) for p, q in zip(method.parameters(), reference.parameters(), strict=True)]
        stats = list(zip(running_stats(method), running_stats(reference), strict=True))
        if sync:  # loss, gradients (DDP's mean) and running statistics of the global batch
            torch.testing.assert_close(mean_loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
            for a, b in grads:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            for a, b in stats:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:  # each rank normalises its own half: none of them matches
            assert not torch.allclose(mean_loss, ref_loss.detach(), rtol=1e-3)
            assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in grads)
            assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in stats)


def test_global_batchnorm_on_two_workers_is_batchnorm_of_the_concatenated_batch():
    spawn(_global_bn_worker)


# ---------------------------------------------------------------- one network evaluated by every rank


def _eval_sync_worker(rank: int, root: str) -> None:
    ds = build(DatasetConfig, yaml.safe_load((CONFIG_DIR / "datasets" / "cifar10.yaml").read_text())
               | {"root": root})
    method = _simclr(gather=True)
    model = DistributedDataParallel(method, broadcast_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data: BN statistics drift apart
    for _ in range(3):
        x0, x1 = torch.randn(8, 3, 32, 32, generator=g) + rank, torch.randn(8, 3, 32, 32, generator=g)
        opt.zero_grad()
        model(x0, x1, None).total.backward()
        opt.step()
    for p in method.parameters():
        assert _same_on_all_ranks(p.detach())
    stats = running_stats(method)
    assert not all(_same_on_all_ranks(t) for t in stats)
    test = load_split(ds, "test")
    device = torch.device("cpu")

    def sharded() -> torch.Tensor:  # what evaluation does: each rank encodes its shard, then gather
        with frozen(method):
            return split_features(Features(method), ds, "test", None, 0, device, 8)[0]

    def whole() -> torch.Tensor:  # one network encoding the whole split
        with frozen(method):
            return extract_features(Features(method), test.images, ds.mean, ds.std, ds.crop_size, device, 8)

    # Without the sync, the gathered features come from two networks.
    assert not torch.allclose(sharded(), whole(), atol=1e-4)

    expected = [all_gather_no_grad(t[None]).mean(0) for t in stats]
    average_buffers(running_stats(method))  # what the loop does before every evaluation and checkpoint
    for t, e in zip(running_stats(method), expected, strict=True):
        torch.testing.assert_close(t, e)
        assert _same_on_all_ranks(t)
    gathered = sharded()
    torch.testing.assert_close(gathered, whole(), rtol=1e-5, atol=1e-6)
    assert _same_on_all_ranks(gathered)


def test_every_rank_evaluates_one_network_after_the_statistics_are_averaged(tmp_path):
    root = write_fixture("cifar10", tmp_path / "cifar10", 2)
    spawn(_eval_sync_worker, str(root))
