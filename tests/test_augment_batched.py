"""BatchAugment: parameter statistics on large batches, and each op against torchvision's own."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from unmix_ray import augment as A
from unmix_ray.augment import BatchAugment, normalize, shift_hue
from unmix_ray.config import AugmentConfig

N = 100_000
CIFAR = AugmentConfig(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                      blur_p=0.5, blur_sigma=(0.1, 2.0))


def make(cfg: AugmentConfig = CIFAR, crop: int = 32, channels: int = 3, seed: int = 0) -> BatchAugment:
    return BatchAugment(cfg, crop, (0.5,) * channels, (0.25,) * channels, torch.Generator().manual_seed(seed))


def rate(mask: torch.Tensor) -> float:
    return mask.float().mean().item()


def test_crop_params_stay_in_range_and_match_torchvision_draws():
    p = make().crop_params(N, torch.device("cpu"))
    area, ratio = p["w"] * p["h"], p["w"] / p["h"]
    assert area.min() >= 0.2 - 1e-6 and area.max() <= 1.0 + 1e-6
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert (p["cx"].abs() + p["w"]).max() <= 1 + 1e-6 and (p["cy"].abs() + p["h"]).max() <= 1 + 1e-6
    assert abs(rate(p["flip"] < 0) - 0.5) < 0.01
    # torchvision redraws boxes that do not fit, which skews the accepted areas; so does crop_params.
    torch.manual_seed(0)
    img = torch.empty(1, 512, 512)
    tv = [RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(20_000)]
    tv_area = torch.tensor([h * w / 512**2 for _, _, h, w in tv])
    assert abs(area.mean().item() - tv_area.mean().item()) < 0.01
    assert abs(area.quantile(0.9).item() - tv_area.quantile(0.9).item()) < 0.02
    # Non-square images: the box is a fraction of each side, with the area fraction kept.
    q = make().crop_params(N, torch.device("cpu"), aspect=2.0)
    assert (q["w"] * q["h"]).min() >= 0.2 - 1e-6 and q["w"].max() <= 1 and q["h"].max() <= 1
    ratio_px = q["w"] * 2.0 / q["h"]
    assert ratio_px.min() >= 3 / 4 - 1e-5 and ratio_px.max() <= 4 / 3 + 1e-5


def test_jitter_gray_blur_params_rates_and_ranges():
    aug = make()
    j = aug.jitter_params(N, torch.device("cpu"))
    for key in ("brightness", "contrast", "saturation"):
        assert j[key].min() >= 0.6 and j[key].max() <= 1.4 and abs(j[key].mean().item() - 1.0) < 0.01
    assert j["hue"].min() >= -0.1 and j["hue"].max() <= 0.1 and abs(j["hue"].mean().item()) < 0.002
    assert abs(rate(j["apply"]) - 0.8) < 0.01
    assert abs(rate(aug.gray_params(N, torch.device("cpu"))) - 0.2) < 0.01
    b = aug.blur_params(N, torch.device("cpu"))
    assert b["sigma"].min() >= 0.1 and b["sigma"].max() <= 2.0 and abs(rate(b["apply"]) - 0.5) < 0.01


def test_resized_crop_matches_torchvision_on_whole_pixel_boxes():
    images = torch.randint(0, 256, (2, 3, 40, 50), dtype=torch.uint8)
    for top, left, h, w, flip, crop in [(5, 3, 20, 17, False, 24), (0, 0, 40, 50, True, 24),
                                        (2, 7, 11, 9, True, 24), (1, 2, 38, 45, False, 16)]:  # last: shrink
        aug = make(crop=crop)
        p = {"w": torch.full((2,), w / 50), "h": torch.full((2,), h / 40),
             "cx": torch.full((2,), (2 * left + w) / 50 - 1), "cy": torch.full((2,), (2 * top + h) / 40 - 1),
             "flip": torch.full((2,), -1.0 if flip else 1.0)}
        ours = aug.resized_crop(images, p)
        ref = TF.resized_crop(images.float() / 255, top, left, h, w, [crop, crop], antialias=True)
        ref = ref.flip(-1) if flip else ref
        torch.testing.assert_close(ours, ref, atol=2e-6, rtol=0)


def test_hue_and_jitter_match_torchvision():
    x = torch.rand(64, 3, 16, 16)
    x[:8] = x[:8, :1].expand(-1, 3, -1, -1)  # grey pixels
    x[8:16, 1] = x[8:16, 0]  # ties between channels
    shift = torch.rand(64) - 0.5
    ref = torch.stack([TF.adjust_hue(x[i], shift[i].item()) for i in range(64)])
    torch.testing.assert_close(shift_hue(x, shift), ref, atol=3e-6, rtol=0)
    aug = make()
    p = aug.jitter_params(64, torch.device("cpu"))
    ours = aug.color_jitter(x, p)
    for i in range(64):
        want = x[i]
        if p["apply"][i]:
            want = TF.adjust_brightness(want, p["brightness"][i].item())
            want = TF.adjust_contrast(want, p["contrast"][i].item())
            want = TF.adjust_saturation(want, p["saturation"][i].item())
            want = TF.adjust_hue(want, p["hue"][i].item())
        torch.testing.assert_close(ours[i], want, atol=1e-5, rtol=0)
    gray = aug.grayscale(x, torch.ones(64, dtype=torch.bool))
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x, 3), atol=1e-6, rtol=0)


def test_identity_recipe_is_normalize_and_views_are_independent():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    same = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    torch.testing.assert_close(make(same)(images), normalize(images, (0.5,) * 3, (0.25,) * 3), atol=1e-5,
                               rtol=0)
    twins = images[:1].expand(16, -1, -1, -1)
    views = make()(twins)
    assert views.shape == (16, 3, 32, 32) and views.dtype == torch.float32
    assert len({tuple(v.flatten()[:64].tolist()) for v in views}) == 16  # one random view per image


def test_cpu_chunks_give_the_same_views_as_one_pass():
    images = torch.randint(0, 256, (A.CPU_CHUNK * 2 + 7, 3, 24, 24), dtype=torch.uint8)
    chunked = make(crop=20, seed=5)(images)
    aug = make(crop=20, seed=5)
    whole = aug.apply(images, aug.params(images))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_grey_images_and_blur():
    cfg = AugmentConfig(jitter=(0.4, 0.4, 0.0, 0.0), gray_p=0.0, blur_p=1.0)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    out = make(cfg, crop=28, channels=1)(images)
    assert out.shape == (8, 1, 28, 28) and torch.isfinite(out).all()
    aug = make(AugmentConfig(blur_p=1.0), crop=32)
    x = torch.rand(4, 3, 32, 32)
    tiny = aug.gaussian_blur(x, {"sigma": torch.full((4,), 1e-3), "apply": torch.ones(4, dtype=torch.bool)})
    torch.testing.assert_close(tiny, x)  # a negligible sigma leaves the image as it is
    strong = aug.gaussian_blur(x, {"sigma": torch.full((4,), 2.0), "apply": torch.ones(4, dtype=torch.bool)})
    assert strong.std() < x.std() * 0.7 and torch.allclose(strong.mean((2, 3)), x.mean((2, 3)), atol=0.05)


def test_resize_weights_rows_sum_to_one():
    start = torch.tensor([0.0, 3.3, 10.0])
    length = torch.tensor([64.0, 17.9, 5.5])
    w = A.resize_weights(start, length, 64, 24)
    torch.testing.assert_close(w.sum(2), torch.ones(3, 24))
    assert w.shape == (3, 24, 64) and w.min() >= 0
    taps = math.ceil(2 * 64 / 24) + 1
    assert (w > 0).sum(2).max() <= taps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda():
    aug = BatchAugment(CIFAR, 32, (0.5,) * 3, (0.25,) * 3, torch.Generator("cuda").manual_seed(0))
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device="cuda")
    out = aug(images)
    assert out.device.type == "cuda" and out.shape == (256, 3, 32, 32) and torch.isfinite(out).all()
