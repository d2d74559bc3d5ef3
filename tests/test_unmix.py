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


# ---- CutMix's pasted area against its definition (shared/UNMIX.md, "The mixture", step 5) --------------
# The box has side sqrt(1 - lam) of H and of W, centred on a pixel drawn uniformly, and is clipped to the
# image. In pixels (the reference CutMix's discretisation): the side H sqrt(1 - lam) is rounded down, and
# the box spans half of it, rounded down, on either side of the centre: rows [cy - h, cy + h), h =
# floor(floor(H sqrt(1 - lam)) / 2), clipped to [0, H); likewise for columns.
H, W = 16, 12
N_DRAWS = 3000
Z = 4.0  # tolerance in standard errors of the mean: a correct CutMix lands outside with probability 6e-5


def pasted_fraction_moments(height: int, width: int, lam: float) -> tuple[float, float]:
    """Mean and variance of the pasted fraction over every centre pixel (each equally likely)."""
    half_h = int(height * np.sqrt(1 - lam)) // 2
    half_w = int(width * np.sqrt(1 - lam)) // 2
    cy, cx = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    rows = np.minimum(cy + half_h, height) - np.maximum(cy - half_h, 0)
    cols = np.minimum(cx + half_w, width) - np.maximum(cx - half_w, 0)
    fractions = rows * cols / (height * width)
    return float(fractions.mean()), float(fractions.var())


def two_images() -> torch.Tensor:
    """Image 0 all zeros, image 1 all ones: a pixel of image 0's mixture came from its partner iff it is 1."""
    return torch.arange(2.0).view(2, 1, 1, 1).expand(2, 1, H, W).contiguous()


def pasted_into_first(mix: torch.Tensor) -> float:
    return int((mix[0] == 1.0).sum()) / (H * W)


def test_the_enumerated_expectation_on_known_answers():
    # 4x4, lam 0.75: side 2, rows [cy - 1, cy + 1) clipped: 1 row for cy = 0, else 2; the same for columns.
    assert pasted_fraction_moments(4, 4, 0.75)[0] == pytest.approx((7 / 4) ** 2 / 16)
    assert pasted_fraction_moments(16, 12, 1.0) == (0.0, 0.0)  # lam 1: nothing pasted
    # lam 0: the side is the image's; a centre-anchored box always keeps some clipped part.
    assert pasted_fraction_moments(8, 8, 0.0)[0] == pytest.approx(((4 + 5 + 6 + 7 + 8 + 7 + 6 + 5) / 8 / 8) ** 2)
    # Large images approach the continuous definition: a side of fraction f with a uniform centre keeps
    # f - f^2/4 of the axis on average, so with 1 - lam = u ~ U(0, 1), f = sqrt(u), the mean pasted
    # area is E[u (1 - sqrt(u)/4)^2] = 1/2 - 1/5 + 1/48.
    assert sampler_moments(200, 200)[0] == pytest.approx(1 / 2 - 1 / 5 + 1 / 48, rel=0.02)


@pytest.mark.parametrize("lam", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_cutmix_pastes_the_expected_area_and_lambda_is_what_remains(lam):
    x = two_images()
    rng = np.random.default_rng(int(lam * 100))
    pasted = []
    for _ in range(N_DRAWS):
        mix, lam_corrected = cutmix(x, cutmix_box(H, W, lam, rng))
        fraction = pasted_into_first(mix)
        assert lam_corrected == pytest.approx(1 - fraction, abs=1e-12)  # lam: the share of image 0 kept
        pasted.append(fraction)
    mean, var = pasted_fraction_moments(H, W, lam)
    assert mean > Z * np.sqrt(var / N_DRAWS)  # a CutMix that never pastes is far outside the tolerance
    assert np.mean(pasted) == pytest.approx(mean, abs=Z * np.sqrt(var / N_DRAWS))
    assert np.var(pasted) == pytest.approx(var, rel=0.25)


def sampler_moments(height: int, width: int) -> tuple[float, float]:
    """Mean and variance of the pasted fraction with lam ~ U(0, 1) (Beta(1, 1)): the conditional
    moments are constant between the lams where a rounded side changes, so the integral is a sum."""
    edges = {0.0, 1.0} | {1 - (k / n) ** 2 for n in (height, width) for k in range(n + 1)}
    edges = sorted(e for e in edges if 0 <= e <= 1)
    m1 = m2 = 0.0
    for a, b in zip(edges, edges[1:]):
        mean, var = pasted_fraction_moments(height, width, (a + b) / 2)
        m1 += (b - a) * mean
        m2 += (b - a) * (var + mean ** 2)
    return m1, m2 - m1 ** 2


def test_mixture_sampler_cutmix_pastes_the_expected_area_and_corrects_lambda():
    sampler = MixtureSampler(MixtureConfig(type="cutmix", beta=1.0), seed=11)
    x, n = two_images(), 4 * N_DRAWS
    pasted = []
    for _ in range(n):
        m = sampler(x)
        fraction = pasted_into_first(m.images)
        assert m.kind == "cutmix" and m.lam == pytest.approx(1 - fraction, abs=1e-12)
        assert torch.equal(m.images[1], 1 - m.images[0])  # image 1 got image 0's box: the same box
        pasted.append(fraction)
    mean, var = sampler_moments(H, W)
    assert np.mean(pasted) == pytest.approx(mean, abs=Z * np.sqrt(var / n))


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
