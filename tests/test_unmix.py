"""The mixture maths of Un-Mix (shared/UNMIX.md): pairing, mixup, CutMix and its lambda, P, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unmix_ray.config import MixtureConfig
from unmix_ray.unmix import MixtureSampler, cutmix, cutmix_box, flip, mixup, unmix_objective


def batch(n: int = 6, c: int = 3, h: int = 16, w: int = 12) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def test_mixup_weights_pair_sample_i_with_n_minus_1_minus_i():
    x = batch()
    lam = 0.3
    mix = mixup(x, lam)
    for i in range(x.shape[0]):
        torch.testing.assert_close(mix[i], lam * x[i] + (1 - lam) * x[x.shape[0] - 1 - i])


def test_cutmix_pasted_area_fraction_equals_corrected_lambda():
    x = batch()
    rng = np.random.default_rng(1)
    for lam in np.linspace(0.01, 0.99, 40):
        box = cutmix_box(16, 12, float(lam), rng)
        mix, lam_corrected = cutmix(x, box)
        from_partner = (mix == x.flip(0)) & (mix != x)
        kept_fraction = 1 - from_partner[0, 0].float().mean().item()
        assert kept_fraction == pytest.approx(lam_corrected, abs=1e-6)
        y1, y2, x1, x2 = box
        assert 0 <= y1 <= y2 <= 16 and 0 <= x1 <= x2 <= 12
        # outside the box every pixel is the sample's own
        outside = torch.ones(16, 12, dtype=torch.bool)
        outside[y1:y2, x1:x2] = False
        assert torch.equal(mix[:, :, outside], x[:, :, outside])


def test_cutmix_box_side_ratio_is_sqrt_one_minus_lambda_before_clipping():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lam = float(rng.uniform(0, 1))
        y1, y2, x1, x2 = cutmix_box(100, 100, lam, rng)
        side = int(100 * np.sqrt(1 - lam)) // 2 * 2
        assert y2 - y1 <= side and x2 - x1 <= side


def test_lambda_one_gives_the_input_back():
    x = batch()
    assert torch.equal(mixup(x, 1.0), x)
    mix, lam = cutmix(x, cutmix_box(16, 12, 1.0, np.random.default_rng(0)))
    assert torch.equal(mix, x) and lam == 1.0


@pytest.mark.parametrize("prob,kind", [(1.0, "mixup"), (0.0, "cutmix")])
def test_probability_one_always_mixup_zero_always_cutmix(prob, kind):
    sampler = MixtureSampler(MixtureConfig(type="both", prob=prob), seed=3)
    kinds = {sampler(batch()).kind for _ in range(200)}
    assert kinds == {kind}


def test_probability_half_mixes_both_ways_in_proportion():
    sampler = MixtureSampler(MixtureConfig(type="both", prob=0.5), seed=3)
    kinds = [sampler(batch(2, 1, 4, 4)).kind for _ in range(2000)]
    assert kinds.count("mixup") / len(kinds) == pytest.approx(0.5, abs=0.04)


def test_types_mixup_cutmix_none():
    assert MixtureSampler(MixtureConfig(type="none"), 0)(batch()) is None
    assert {MixtureSampler(MixtureConfig(type="mixup", prob=0.0), 0)(batch()).kind for _ in range(20)} == {"mixup"}
    assert {MixtureSampler(MixtureConfig(type="cutmix", prob=1.0), 0)(batch()).kind for _ in range(20)} == {"cutmix"}


def test_lambda_is_beta_distributed():
    sampler = MixtureSampler(MixtureConfig(type="mixup", beta=1.0), seed=0)
    lams = np.array([sampler(batch(2, 1, 2, 2)).lam for _ in range(4000)])
    assert lams.mean() == pytest.approx(0.5, abs=0.02)  # Beta(1,1) = U(0,1): mean 1/2, var 1/12
    assert lams.var() == pytest.approx(1 / 12, abs=0.01)
    sampler = MixtureSampler(MixtureConfig(type="mixup", beta=4.0), seed=0)
    lams = np.array([sampler(batch(2, 1, 2, 2)).lam for _ in range(4000)])
    assert lams.var() == pytest.approx(1 / 36, abs=0.005)  # Beta(4,4): var = 16/(64*9)


def test_same_seed_same_mixture_and_state_roundtrip():
    x = batch()
    a, b = MixtureSampler(MixtureConfig(type="both"), 7), MixtureSampler(MixtureConfig(type="both"), 7)
    for _ in range(20):
        ma, mb = a(x), b(x)
        assert ma.kind == mb.kind and ma.lam == mb.lam and torch.equal(ma.images, mb.images)
    state = a.state()
    first = [a(x).lam for _ in range(5)]
    a.load_state(state)
    assert [a(x).lam for _ in range(5)] == first
    c = MixtureSampler(MixtureConfig(type="both"), 8)
    assert [c(x).lam for _ in range(5)] != first


def test_mixture_stays_on_the_batch_device_and_dtype():
    x = batch().to(torch.float64)
    m = MixtureSampler(MixtureConfig(type="both"), 0)(x)
    assert m.images.dtype == x.dtype and m.images.device == x.device and m.images.shape == x.shape


def test_flipped_embedding_shortcut_equals_forward_of_flipped_mixture_with_train_mode_bn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4),
                              torch.nn.BatchNorm1d(4)).train()
    mix = MixtureSampler(MixtureConfig(type="both"), 0)(batch(8)).images
    torch.testing.assert_close(flip(net(mix)), net(mix.flip(0)), rtol=1e-5, atol=1e-5)


def test_unmix_objective_weights_and_off_switch():
    def loss(a, b):  # an asymmetric toy base loss, so argument order matters
        return (a * 2 - b).pow(2).mean()

    z0, z1, zm = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    out = unmix_objective(loss, z0, z1, zm, 0.3)
    torch.testing.assert_close(out.clean, loss(z0, z1))
    torch.testing.assert_close(out.mixed, 0.3 * loss(z1, zm) + 0.7 * loss(z1, zm.flip(0)))
    torch.testing.assert_close(out.total, out.clean + out.mixed)
    off = unmix_objective(loss, z0, z1, None, 1.0)
    assert torch.equal(off.total, loss(z0, z1)) and off.mixed.item() == 0.0


def test_flip_reverses_every_tensor_in_a_tree():
    a, b = torch.arange(4), torch.arange(8).view(4, 2)
    fa, (fb, s) = flip((a, (b, "x")))
    assert torch.equal(fa, a.flip(0)) and torch.equal(fb, b.flip(0)) and s == "x"
