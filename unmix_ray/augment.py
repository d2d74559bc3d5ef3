"""Batched SSL augmentation on the training device, with per-sample random parameters.

torchvision's transforms draw one set of parameters per call, so a batch would share one crop and
one jitter; SSL needs independent parameters per image. Everything here is a handful of tensor ops
over the whole batch; there is no per-image Python loop and no host synchronisation, so it runs on
the GPU as well as on the CPU.

- Random resized crop + horizontal flip: each image's crop box becomes two small interpolation
  matrices (rows x source rows, columns x source columns) and the crop is two batched matmuls. The
  weights are the ones of torchvision's ``resize(..., antialias=True)`` on the cropped box (bilinear
  when enlarging, a triangle filter as wide as the scale factor when shrinking), so a crop matches
  ``v2.functional.resized_crop`` to float precision for integer boxes.
- Colour jitter: brightness, contrast, saturation (blends with black, the mean grey and the grey
  image, each clamped, as torchvision does) and a hue shift in HSV computed directly from max, min
  and chroma (the same result as torchvision's RGB -> HSV -> RGB round trip, in fewer ops).
- Grayscale (ITU-R 601 luma, torchvision's weights) and Gaussian blur (a per-sample separable kernel
  as a grouped convolution).
- Views cropped already (``crop=False``; the streamed ImageNet loader crops each view from the whole
  image in its workers): the flip and the rest of the recipe, no second crop.

Differences from torchvision's per-sample pipeline, chosen for batching: crop boxes are continuous
(torchvision rounds them to whole pixels); colour jitter applies brightness, contrast, saturation,
hue in that fixed order (torchvision shuffles the order per image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unmix_ray.config import AugmentConfig

# Luma weights of torchvision's rgb_to_grayscale (ITU-R 601-2).
LUMA = (0.2989, 0.587, 0.114)
# torchvision's RandomResizedCrop tries this many (area, ratio) draws before falling back.
CROP_ATTEMPTS = 10
# Images per chunk when augmenting on the CPU (see BatchAugment.__call__).
CPU_CHUNK = 64


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] grey (a 1-channel input is returned as it is)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images in [0, 1] by ``shift`` turns (one value per image).

    Value (max) and chroma (max - min) are unchanged by a hue rotation. With the hue ``h`` in sixths
    of a turn, channel c of the result is ``max - chroma * clamp(2 - d_c, 0, 1)``, where ``d_c`` is
    the distance around the hue circle from ``h + (3, 1, -1)[c]`` to 0: the standard HSV -> RGB
    formula, without building the HSV image. It is written with arithmetic and clamps only (no
    ``where``, comparisons or ``remainder``): those are the fast element-wise kernels on the CPU.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    chroma = maxc - x.amin(1)
    inv = chroma.clamp_min(1e-12).reciprocal_()  # a grey pixel (chroma 0) keeps its value whatever the hue
    # 1 where the channel is below the maximum (any difference times 1e30 saturates the clamp), else 0.
    below_r = ((maxc - r) * 1e30).clamp_max_(1.0)
    below_g = ((maxc - g) * 1e30).clamp_max_(1.0)
    # Which channel holds the maximum (ties go to red, then green), as 0/1 weights.
    is_r = 1.0 - below_r
    is_g = (1.0 - below_g).mul_(below_r)
    is_b = below_r.mul_(below_g)
    hue = (g - b).mul_(is_r)
    hue += (b - r).add_(chroma, alpha=2.0).mul_(is_g)
    hue += (r - g).add_(chroma, alpha=4.0).mul_(is_b)
    hue.mul_(inv).add_(shift.view(-1, 1, 1), alpha=6.0)  # in [-4, 8] sixths
    hue -= (hue * (1.0 / 6.0)).floor_().mul_(6.0)  # in [0, 6)
    # (3, 1, -1) built on the device: a host tensor copied over would synchronise the stream each call
    offsets = torch.arange(3, device=x.device, dtype=x.dtype).mul_(-2.0).add_(3.0).view(1, 3, 1, 1)
    pos = hue.unsqueeze(1) + offsets  # in [-1, 9): the circular distance to 0 is min(|p|, |p - 6|)
    dist = (pos - 6.0).abs_().clamp_max_(pos.abs_())
    ramp = dist.neg_().add_(2.0).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - ramp.mul_(chroma.unsqueeze(1))


def resize_weights(start: torch.Tensor, length: torch.Tensor, n_in: int, n_out: int,
                   flip: torch.Tensor | None = None) -> torch.Tensor:
    """Interpolation matrices [N, n_out, n_in] resizing the span ``[start, start + length)`` (pixels,
    one per image) of an axis of ``n_in`` pixels to ``n_out`` pixels, reversed where ``flip``.

    Row o holds the weights of output pixel o: a triangle filter centred on its source position,
    one source pixel wide when enlarging (bilinear) and ``length / n_out`` wide when shrinking
    (antialiasing), restricted to the pixels the span covers and normalised to sum to one. The taps
    are computed sparsely (at most ``ceil(2 * n_in / n_out) + 1`` per row) and scattered.
    """
    n, dev, dt = start.shape[0], start.device, start.dtype
    scale = length / n_out
    centre = start[:, None] + (torch.arange(n_out, device=dev, dtype=dt) + 0.5) * scale[:, None] - 0.5
    if flip is not None:
        centre = torch.where(flip[:, None], centre.flip(1), centre)
    support = scale.clamp(min=1.0)[:, None, None]
    taps = math.ceil(2 * max(n_in / n_out, 1.0)) + 1  # the widest span is the whole axis
    src = (centre[:, :, None] - support).floor_().add_(1.0) + torch.arange(taps, device=dev, dtype=dt)
    w = (centre[:, :, None] - src).abs_().div_(support).neg_().add_(1.0).clamp_(min=0.0)
    # Pixels the span covers (a sliver under 1e-3 px, float rounding of a whole-pixel box, is not one).
    first = (start + 1e-3).floor().clamp(min=0)[:, None, None]
    last = (start + length - 1e-3).ceil().clamp(max=n_in)[:, None, None] - 1
    w = w * ((src >= first) & (src <= last))
    w = w / w.sum(2, keepdim=True).clamp_(min=1e-12)
    index = src.clamp_(0, n_in - 1).long()
    return torch.zeros(n, n_out, n_in, device=dev, dtype=dt).scatter_add_(2, index, w)


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

    # ---- random parameters (one set per image) -------------------------------------------------------

    def crop_params(self, n: int, device: torch.device, aspect: float = 1.0) -> dict[str, torch.Tensor]:
        """Per-sample crop box and flip, drawn as torchvision's RandomResizedCrop draws them.

        Area fraction ~ U(crop_scale), log aspect ratio ~ U(log crop_ratio); a draw whose box does not
        fit the image is redrawn (up to 10 tries), then the whole image is used, with its aspect ratio
        clamped into crop_ratio. ``aspect`` is the image's width / height. Returns box width ``w`` and
        height ``h`` as fractions of the image side, box centre ``cx``, ``cy`` in [-1, 1] image
        coordinates, and ``flip`` (-1 mirrored, +1 not).
        """
        cfg, g = self.cfg, self.g
        area = _uniform(n * CROP_ATTEMPTS, *cfg.crop_scale, g, device).view(n, CROP_ATTEMPTS)
        log_lo, log_hi = math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1])
        ratio = _uniform(n * CROP_ATTEMPTS, log_lo, log_hi, g, device).exp().view(n, CROP_ATTEMPTS)
        w_try = (area * ratio / aspect).sqrt()
        h_try = (area / ratio * aspect).sqrt()
        fits = (w_try <= 1.0) & (h_try <= 1.0)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first fitting draw (0 when none fits)
        found = fits.any(1)
        # Fallback (torchvision's): the whole image, cropped to the nearest allowed aspect ratio.
        fb_ratio = min(max(aspect, cfg.crop_ratio[0]), cfg.crop_ratio[1])
        fb_w, fb_h = (fb_ratio / aspect, 1.0) if fb_ratio < aspect else (1.0, aspect / fb_ratio)
        w = torch.where(found, w_try.gather(1, first).squeeze(1), fb_w)
        h = torch.where(found, h_try.gather(1, first).squeeze(1), fb_h)
        cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g, device=device) < cfg.flip_p, -1.0, 1.0)
        return {"w": w, "h": h, "cx": cx, "cy": cy, "flip": flip}

    def jitter_params(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-sample colour jitter factors (torchvision's ranges) and whether jitter applies at all."""
        b, c, s, h = self.cfg.jitter
        g = self.g
        return {
            "brightness": _uniform(n, max(0.0, 1 - b), 1 + b, g, device),
            "contrast": _uniform(n, max(0.0, 1 - c), 1 + c, g, device),
            "saturation": _uniform(n, max(0.0, 1 - s), 1 + s, g, device),
            "hue": _uniform(n, -h, h, g, device),
            "apply": torch.rand(n, generator=g, device=device) < self.cfg.jitter_p,
        }

    def gray_params(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, generator=self.g, device=device) < self.cfg.gray_p

    def blur_params(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {"sigma": _uniform(n, *self.cfg.blur_sigma, self.g, device),
                "apply": torch.rand(n, generator=self.g, device=device) < self.cfg.blur_p}

    # ---- the operations ------------------------------------------------------------------------------

    def crop_weights(self, params: dict[str, torch.Tensor], height: int, width: int,
                     scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """The interpolation matrices of the boxes in ``params``: rows [N, crop, H], columns [N, crop, W]."""
        p = params
        left = (p["cx"] + 1 - p["w"]) * (width / 2)
        top = (p["cy"] + 1 - p["h"]) * (height / 2)
        wx = resize_weights(left, p["w"] * width, width, self.crop, p["flip"] < 0)
        wy = resize_weights(top, p["h"] * height, height, self.crop)
        return (wy.mul_(scale) if scale != 1.0 else wy), wx

    def resized_crop(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Crop each image to its box and resize it to ``crop x crop`` (flipped where drawn).

        ``x`` is uint8 (scaled to [0, 1] here) or float; the result is float32. ``params`` may carry
        the matrices already (``wy``, ``wx`` from ``crop_weights``, as ``params()`` adds them).
        """
        n, ch, hgt, wid = x.shape
        p = params if params is not None else self.crop_params(n, x.device, aspect=wid / hgt)
        scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
        if "wy" in p:
            wy, wx = p["wy"], p["wx"]
            wy = wy * scale if scale != 1.0 else wy
        else:
            wy, wx = self.crop_weights(p, hgt, wid, scale)
        cols = torch.bmm(x.float().reshape(n, ch * hgt, wid), wx.transpose(1, 2))  # [N, C*H, crop]
        return torch.matmul(wy.unsqueeze(1), cols.view(n, ch, hgt, self.crop))  # [N, C, crop, crop]

    def color_jitter(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        n = x.shape[0]
        p = params if params is not None else self.jitter_params(n, x.device)
        # Images drawn without jitter get the identity factors (1, 1, 1, 0) instead of a select at the end.
        keep = p["apply"]
        one = torch.ones((), device=x.device)
        out = (x * _per_sample(torch.where(keep, p["brightness"], one))).clamp_(0.0, 1.0)
        c = torch.where(keep, p["contrast"], one)
        channel_means = out.mean(dim=(2, 3))  # the mean grey level is the luma of the channel means
        if x.shape[1] == 3:  # scalar weights: no host-to-device copy on the hot path
            mean = channel_means[:, 0] * LUMA[0] + channel_means[:, 1] * LUMA[1] + channel_means[:, 2] * LUMA[2]
        else:
            mean = channel_means[:, 0]
        out.mul_(_per_sample(c)).add_(_per_sample(mean * (1 - c))).clamp_(0.0, 1.0)
        if x.shape[1] == 3:
            s = _per_sample(torch.where(keep, p["saturation"], one))
            grey = _luma(out) * (1 - s)  # (computed before out is scaled in place)
            out.mul_(s).add_(grey).clamp_(0.0, 1.0)
            if self.cfg.jitter[3] > 0:
                out = shift_hue(out, torch.where(keep, p["hue"], 0.0))
        return out

    def grayscale(self, x: torch.Tensor, apply: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] != 3:
            return x
        apply = apply if apply is not None else self.gray_params(x.shape[0], x.device)
        return torch.where(_per_sample(apply), _luma(x), x)

    def gaussian_blur(self, x: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        n, ch, hgt, wid = x.shape
        p = params if params is not None else self.blur_params(n, x.device)
        radius = max(1, int(0.05 * self.crop))  # kernel ~10% of the image side, as in SimCLR
        offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * p["sigma"].view(-1, 1) ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # [n*ch, k]
        flat = x.reshape(1, n * ch, hgt, wid)
        flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(n * ch, 1, 1, -1),
                        groups=n * ch)
        flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(n * ch, 1, -1, 1),
                        groups=n * ch)
        return torch.where(_per_sample(p["apply"]), flat.view_as(x), x)

    def params(self, images: torch.Tensor, crop: bool = True) -> dict[str, dict[str, torch.Tensor] | torch.Tensor]:
        """Every random parameter of one view of ``images``, one set per image (without ``crop``: the
        flip in place of the crop box)."""
        n, _, hgt, wid = images.shape
        dev = images.device
        out: dict[str, dict[str, torch.Tensor] | torch.Tensor] = {}
        if crop:
            box = self.crop_params(n, dev, wid / hgt)
            box["wy"], box["wx"] = self.crop_weights(box, hgt, wid)  # built once for the batch, not per chunk
            out["crop"] = box
        else:
            if (hgt, wid) != (self.crop, self.crop):
                raise ValueError(f"views to augment without cropping must be {self.crop}x{self.crop}, got "
                                 f"{wid}x{hgt}")
            out["flip"] = torch.rand(n, generator=self.g, device=dev) < self.cfg.flip_p
        if self.cfg.jitter_p > 0:
            out["jitter"] = self.jitter_params(n, dev)
        if self.cfg.gray_p > 0 and images.shape[1] == 3:
            out["gray"] = self.gray_params(n, dev)
        if self.cfg.blur_p > 0:
            out["blur"] = self.blur_params(n, dev)
        return out

    def apply(self, images: torch.Tensor, params: dict) -> torch.Tensor:
        """One view of ``images`` with the given parameters (see ``params``)."""
        if "crop" in params:
            x = self.resized_crop(images, params["crop"])
        else:
            x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            x = torch.where(_per_sample(params["flip"]), x.flip(-1), x)
        if "jitter" in params:
            x = self.color_jitter(x, params["jitter"])
        if "gray" in params:
            x = self.grayscale(x, params["gray"])
        if "blur" in params:
            x = self.gaussian_blur(x, params["blur"])
        return x.sub_(self.mean).div_(self.std)

    def __call__(self, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """One augmented view of each image; ``crop=False`` for views already cropped to ``crop_size``."""
        params = self.params(images, crop)
        n = images.shape[0]
        if images.device.type != "cpu" or n <= CPU_CHUNK:
            return self.apply(images, params)
        # On the CPU, a few hundred images' worth of temporaries per op means fresh pages from the
        # kernel on every op (glibc returns big freed blocks to the system); chunks of CPU_CHUNK
        # images keep them smaller and cache-resident: 1.3-1.8x the throughput of one 512-image pass
        # on the 2-core test machine (CPU time, single thread).
        out = torch.empty(n, images.shape[1], self.crop, self.crop)
        for i in range(0, n, CPU_CHUNK):
            out[i:i + CPU_CHUNK] = self.apply(images[i:i + CPU_CHUNK], _slice(params, i, i + CPU_CHUNK))
        return out


def _slice(params: dict | torch.Tensor, lo: int, hi: int) -> dict | torch.Tensor:
    if isinstance(params, dict):
        return {k: _slice(v, lo, hi) for k, v in params.items()}
    return params[lo:hi]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
              size: int | None = None) -> torch.Tensor:
    """The evaluation transform: uint8 -> normalised float, optionally resized (no augmentation)."""
    x = images.float().div_(255.0)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s
