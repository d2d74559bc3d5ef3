"""Batched SSL augmentation on the training device, with per-sample random parameters.

torchvision's transforms draw one set of parameters per call, so a batch would share one crop and
one jitter; SSL needs independent parameters per image. Everything here is one tensor op over the
whole batch (crop and flip are one ``affine_grid`` + ``grid_sample``; blur is a grouped convolution);
there is no per-image Python loop and no host synchronisation.

Differences from torchvision's per-sample pipeline, chosen for batching: a crop whose sampled
aspect does not fit the image is clipped to it (torchvision retries 10 times, then centre-crops);
colour jitter applies brightness, contrast, saturation, hue in that fixed order (torchvision
shuffles the order per image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from unmix_ray.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


class BatchAugment:
    """One random view per image: ``view(uint8 [N, C, H, W]) -> float [N, C, crop, crop]``, normalised."""

    def __init__(self, config: AugmentConfig, crop_size: int, mean: tuple[float, ...], std: tuple[float, ...],
                 generator: torch.Generator):
        self.cfg = config
        self.crop = crop_size
        self.g = generator
        device = generator.device
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def crop_params(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-sample crop scale (area fraction), log aspect ratio, centre and flip sign."""
        cfg, g = self.cfg, self.g
        area = _uniform(n, *cfg.crop_scale, g, device)
        log_ratio = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g, device)
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image side
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g, device=device) < cfg.flip_p, -1.0, 1.0)
        return {"w": w, "h": h, "cx": cx, "cy": cy, "flip": flip}

    def resized_crop(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        p = self.crop_params(n, x.device)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = p["w"] * p["flip"]
        theta[:, 0, 2] = p["cx"]
        theta[:, 1, 1] = p["h"]
        theta[:, 1, 2] = p["cy"]
        grid = F.affine_grid(theta, [n, x.shape[1], self.crop, self.crop], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def color_jitter(self, x: torch.Tensor) -> torch.Tensor:
        n, dev, g = x.shape[0], x.device, self.g
        b, c, s, h = self.cfg.jitter
        out = x * _per_sample(_uniform(n, max(0.0, 1 - b), 1 + b, g, dev))
        out = out.clamp(0, 1)
        mean = _gray(out).mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * _per_sample(_uniform(n, max(0.0, 1 - c), 1 + c, g, dev)) + mean).clamp(0, 1)
        if x.shape[1] == 3:
            gray = _gray(out)
            out = ((out - gray) * _per_sample(_uniform(n, max(0.0, 1 - s), 1 + s, g, dev)) + gray).clamp(0, 1)
            if h > 0:
                hsv = _rgb_to_hsv(out)
                shift = _uniform(n, -h, h, g, dev).view(-1, 1, 1)
                hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], dim=1)
                out = _hsv_to_rgb(hsv)
        apply = torch.rand(n, generator=g, device=dev) < self.cfg.jitter_p
        return torch.where(_per_sample(apply), out, x)

    def gaussian_blur(self, x: torch.Tensor) -> torch.Tensor:
        n, ch, hgt, wid = x.shape
        radius = max(1, int(0.05 * self.crop))  # kernel ~10% of the image side, as in SimCLR
        sigma = _uniform(n, *self.cfg.blur_sigma, self.g, x.device)
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # [n*ch, k]
        flat = x.reshape(1, n * ch, hgt, wid)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * ch, 1, 1, -1),
                        groups=n * ch)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * ch, 1, -1, 1),
                        groups=n * ch)
        apply = torch.rand(n, generator=self.g, device=x.device) < self.cfg.blur_p
        return torch.where(_per_sample(apply), flat.view_as(x), x)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        x = self.resized_crop(x)
        if self.cfg.jitter_p > 0:
            x = self.color_jitter(x)
        if self.cfg.gray_p > 0 and x.shape[1] == 3:
            apply = torch.rand(x.shape[0], generator=self.g, device=x.device) < self.cfg.gray_p
            x = torch.where(_per_sample(apply), _gray(x), x)
        if self.cfg.blur_p > 0:
            x = self.gaussian_blur(x)
        return (x - self.mean) / self.std


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              size: int | None = None) -> torch.Tensor:
    """The evaluation transform: uint8 -> normalised float, optionally resized (no augmentation)."""
    x = images.float().div_(255.0)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
