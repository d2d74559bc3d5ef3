"""The pure loss functions and LARS, checked against direct transcriptions of their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from unmix_ray.config import OptimConfig
from unmix_ray.losses.byol import normalized_mse
from unmix_ray.losses.info_nce import info_nce
from unmix_ray.losses.nt_xent import nt_xent
from unmix_ray.losses.swav import sinkhorn, swapped_prediction
from unmix_ray.methods.byol import target_momentum
from unmix_ray.optim import LARS, build_optimizer

torch.set_num_threads(1)


def unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_info_nce_matches_its_formula():
    q, k, queue, t = unit(5, 8, seed=1), unit(5, 8, seed=2), unit(7, 8, seed=3), 0.2
    expected = []
    for i in range(5):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ n) / t) for n in queue)
        expected.append(-math.log(pos / (pos + neg)))
    assert info_nce(q, k, queue, t).item() == pytest.approx(sum(expected) / 5, rel=1e-5)


def test_info_nce_gradient_reaches_queries_only():
    q, k = unit(4, 6, seed=1).requires_grad_(), unit(4, 6, seed=2).requires_grad_()
    info_nce(q, k, unit(9, 6, seed=3), 0.1).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_nt_xent_matches_its_formula():
    a, b, t = unit(4, 6, seed=4), unit(4, 6, seed=5), 0.5
    z = torch.cat([a, b])
    total = 0.0
    for i in range(8):
        partner = (i + 4) % 8
        sims = [math.exp(float(z[i] @ z[j]) / t) for j in range(8) if j != i]
        total += -math.log(math.exp(float(z[i] @ z[partner]) / t) / sum(sims))
    assert nt_xent(a, b, t, gather=False).item() == pytest.approx(total / 8, rel=1e-5)


def test_normalized_mse_is_two_minus_two_cos_and_stops_target_gradient():
    p = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)).requires_grad_()
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).requires_grad_()
    expected = ((F.normalize(p, dim=1) - F.normalize(z, dim=1)) ** 2).sum(dim=1).mean()
    loss = normalized_mse(p, z)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert z.grad is None and p.grad.abs().sum() > 0


def naive_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp written in the B x K orientation: rows = samples (mass 1 each),
    columns = prototypes (mass B / K each)."""
    p = torch.exp(scores.double() / eps)
    b, k = p.shape
    p = p / p.sum()
    for _ in range(iters):
        p = p / p.sum(dim=0, keepdim=True) / k
        p = p / p.sum(dim=1, keepdim=True) / b
    return (p * b).float()


def test_sinkhorn_matches_a_direct_transcription():
    scores = unit(12, 8, seed=6) @ unit(5, 8, seed=7).T
    expected = naive_sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3), expected, rtol=1e-4, atol=1e-6)


def test_sinkhorn_codes_meet_their_marginals():
    b, k = 16, 4
    scores = unit(b, 8, seed=8) @ unit(k, 8, seed=9).T
    errors = []
    for iters in (1, 3, 30, 300):
        codes = sinkhorn(scores, eps=0.05, iters=iters)
        # Every sample's code is a distribution (exact after the last column normalisation) ...
        torch.testing.assert_close(codes.sum(dim=1), torch.ones(b))
        assert (codes >= 0).all()
        # ... and every prototype's share approaches B / K as the iterations go on.
        errors.append((codes.sum(dim=0) - b / k).abs().max().item())
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[-1] < 1e-3 * b / k


def test_sinkhorn_is_permutation_equivariant():
    scores = unit(10, 8, seed=10) @ unit(6, 8, seed=11).T
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sinkhorn(scores[perm]), sinkhorn(scores)[perm])


def test_swapped_prediction_matches_its_formula():
    g = torch.Generator().manual_seed(3)
    sa, sb = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    qa, qb = (torch.softmax(torch.randn(5, 4, generator=g), 1) for _ in range(2))
    t = 0.1
    ce_ab = -(qb * torch.log_softmax(sa / t, 1)).sum(1).mean()
    ce_ba = -(qa * torch.log_softmax(sb / t, 1)).sum(1).mean()
    torch.testing.assert_close(swapped_prediction(sa, qa, sb, qb, t), (ce_ab + ce_ba) / 2)


def test_byol_target_momentum_schedule():
    assert target_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert target_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert target_momentum(0.99, 1.0) == pytest.approx(1.0)


def test_lars_step_matches_larc_rule():
    w0 = torch.tensor([3.0, 4.0])  # ||w|| = 5
    g = torch.tensor([0.6, 0.8])  # ||g|| = 1
    zero = torch.zeros(3)
    w = torch.nn.Parameter(w0.clone())
    z = torch.nn.Parameter(zero.clone())
    lr, wd, trust, mom = 0.5, 0.1, 0.001, 0.9
    opt = LARS([{"params": [w, z], "weight_decay": wd}], lr=lr, momentum=mom, trust_coefficient=trust)
    local_lr = trust * 5.0 / (1.0 + wd * 5.0 + 1e-8)
    d1 = (g + wd * w0) * local_lr
    w.grad, z.grad = g.clone(), torch.ones(3)
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - lr * d1)
    # A zero-norm tensor takes the plain gradient (LARC leaves it unscaled).
    torch.testing.assert_close(z.detach(), zero - lr * torch.ones(3))
    # Second step: heavy-ball momentum on the scaled direction.
    w1 = w.detach().clone()
    w.grad = g.clone()
    norm1 = w1.norm().item()
    d2 = (g + wd * w1) * (trust * norm1 / (1.0 + wd * norm1 + 1e-8))
    opt.step()
    torch.testing.assert_close(w.detach(), w1 - lr * (mom * d1 + d2))


def test_lars_clip_caps_the_local_rate_at_the_global_one():
    w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
    opt = LARS([w], lr=1e-5, momentum=0.0, trust_coefficient=1.0, clip=True)
    w.grad = torch.tensor([1e-3, 0.0])  # unclipped local lr 1 / 1e-3 >> lr
    opt.step()
    torch.testing.assert_close(w.detach(), torch.tensor([1.0 - 1e-5 * 1e-3, 0.0]))


def test_build_optimizer_makes_lars_with_the_config_groups():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    config = OptimConfig(name="lars", lr=0.6, base_batch_size=128, weight_decay=1e-6, wd_exclude_norm_bias=True)
    opt = build_optimizer(model, config, global_batch=256)
    assert isinstance(opt, LARS)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1.2)] * 2
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-6, 0.0]


def test_info_nce_stays_float32_under_bf16_autocast():
    q, k, queue = unit(8, 16, seed=1), unit(8, 16, seed=2), unit(64, 16, seed=3)
    exact = info_nce(q, k, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = info_nce(q, k, queue, 0.07)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-6, atol=1e-6)


def test_nt_xent_stays_float32_under_bf16_autocast():
    """Under bf16 autocast the loss equals the float32 loss to float32 precision, and its gradient too:
    the logits are computed in float32 whatever the inputs' dtype."""
    a, b = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)), unit(16, 32, seed=2)
    a32, a16 = a.clone().requires_grad_(), a.clone().requires_grad_()
    exact = nt_xent(a32, b, 0.1, gather=False)
    exact.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = nt_xent(a16, b, 0.1, gather=False)
    under_autocast.backward()
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1.3e-6, atol=1e-6)
    torch.testing.assert_close(a16.grad, a32.grad, rtol=1.3e-6, atol=1e-7)
    # A bfloat16 matmul of the same inputs is not that close: the check can fail.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.1
    exact_logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / 0.1
    assert bf16_logits.dtype == torch.bfloat16 and (bf16_logits.float() - exact_logits).abs().max() > 1e-3
