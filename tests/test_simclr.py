"""SimCLR's NT-Xent against a hand-written reference, and SimCLR with Un-Mix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unmix_ray.config import MethodConfig, MixtureConfig
from unmix_ray.losses.nt_xent import nt_xent
from unmix_ray.methods import build_method
from unmix_ray.models import NarrowResNet
from unmix_ray.unmix import MixtureSampler, flip


def reference_nt_xent(a: torch.Tensor, b: torch.Tensor, t: float) -> float:
    """The SimCLR paper's loss, written as the double loop of its definition."""
    z = F.normalize(torch.cat([a, b]), dim=1).double()
    n = a.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(z[i] @ z[k] / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / t) / denom)
    return total / (2 * n)


def test_nt_xent_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.1, 0.5, 1.0):
        assert nt_xent(a, b, t).item() == __import__("pytest").approx(reference_nt_xent(a, b, t), rel=1e-5)


def test_nt_xent_is_low_for_matching_pairs():
    a = torch.randn(16, 8)
    assert nt_xent(a, a + 0.01 * torch.randn_like(a), 0.1) < nt_xent(a, torch.randn(16, 8), 0.1)


def simclr(seed: int = 0):
    torch.manual_seed(seed)
    cfg = MethodConfig(name="simclr", params={"temperature": 0.5, "proj_hidden": 32, "proj_dim": 16})
    return build_method(cfg, NarrowResNet(3, width=8)).train()


def test_unmix_simclr_with_mixing_off_equals_plain_nt_xent():
    model = simclr()
    x0, x1 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    out = model(x0, x1, None)
    expected = nt_xent(model.outputs(x0), model.outputs(x1), 0.5)
    torch.testing.assert_close(out.total, expected)
    assert out.mixed.item() == 0.0


def test_unmix_simclr_mixed_terms_use_flipped_embeddings_equal_to_real_forward():
    model = simclr()
    x0, x1 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    mixture = MixtureSampler(MixtureConfig(type="both"), 1)(x0)
    out = model(x0, x1, mixture)
    z1, zm = model.outputs(x1), model.outputs(mixture.images)
    real_flip = model.outputs(mixture.images.flip(0))  # a genuine forward pass of flip(mix), train-mode BN
    torch.testing.assert_close(flip(zm), real_flip, rtol=1e-4, atol=1e-5)
    lam = mixture.lam
    expected = lam * nt_xent(z1, zm, 0.5) + (1 - lam) * nt_xent(z1, real_flip, 0.5)
    torch.testing.assert_close(out.mixed, expected, rtol=1e-4, atol=1e-5)


def test_simclr_loss_falls_on_a_fixed_batch():
    model = simclr()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0, x1 = torch.randn(16, 3, 16, 16), torch.randn(16, 3, 16, 16)
    sampler = MixtureSampler(MixtureConfig(type="both"), 0)
    mixture = sampler(x0)
    losses = []
    for _ in range(15):
        out = model(x0, x1, mixture)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
