"""Two-view augmentation throughput: batched ``BatchAugment`` against torchvision's per-sample PIL pipeline.

Both apply the same recipe (RandomResizedCrop scale 0.2-1 to 32, horizontal flip, colour jitter
(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2, normalisation) to CIFAR-sized 32x32 RGB images, in
the same run, and report views per second (two views per image) as the median over repeats.

    python bench/augment.py                 # CPU, one core each (one torch thread against one PIL loop)
    python bench/augment.py --threads 2     # BatchAugment with 2 intra-op threads
    python bench/augment.py --device cuda   # BatchAugment on a GPU (the PIL pipeline stays on CPU)

The last line printed is one JSON object: {"batched_views_per_s", "pil_views_per_s", "ratio", ...}.
Repeats alternate between the two, so both see the same machine load (reported as load_avg_1min).
The default compares one core with one core. More threads help only on idle cores: with more
threads than free cores, every small op's OpenMP barrier waits for a descheduled thread and the
batched figure collapses (seen on the shared 2-core test machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unmix_ray.augment import BatchAugment  # noqa: E402
from unmix_ray.config import AugmentConfig  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def pil_pipeline(cfg: AugmentConfig, crop: int) -> v2.Compose:
    return v2.Compose([
        v2.RandomResizedCrop(crop, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.RandomApply([v2.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        v2.RandomGrayscale(cfg.gray_p),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


def time_pil(images: np.ndarray, cfg: AugmentConfig, crop: int) -> float:
    """Seconds for two views of every image, one image at a time (as a Dataset.__getitem__ would)."""
    pipeline = pil_pipeline(cfg, crop)
    pils = [Image.fromarray(im) for im in images]  # HWC uint8, decoded once as torchvision's CIFAR10 does
    start = time.perf_counter()
    for im in pils:
        pipeline(im)
        pipeline(im)
    return time.perf_counter() - start


def time_batched(batch: torch.Tensor, cfg: AugmentConfig, crop: int, device: torch.device) -> float:
    """Seconds for two views of every image in ``batch`` (uint8 NCHW already on ``device``)."""
    aug = BatchAugment(cfg, crop, MEAN, STD, torch.Generator(device).manual_seed(0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    aug(batch)
    aug(batch)
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="device for BatchAugment (cpu or cuda)")
    ap.add_argument("--batch", type=int, default=512, help="images per BatchAugment call")
    ap.add_argument("--pil-images", type=int, default=1024, help="images per PIL repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads for BatchAugment")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = AugmentConfig(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2,
                        blur_p=0.0)
    crop = 32
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(max(args.batch, args.pil_images), 32, 32, 3), dtype=np.uint8)
    batch = torch.from_numpy(images[: args.batch]).permute(0, 3, 1, 2).contiguous().to(device)

    time_batched(batch, cfg, crop, device)  # warm-up (kernel selection, allocator)
    time_pil(images[:64], cfg, crop)
    batched, pil = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        batched.append(2 * args.batch / time_batched(batch, cfg, crop, device))
        pil.append(2 * args.pil_images / time_pil(images[: args.pil_images], cfg, crop))
    a, b = statistics.median(batched), statistics.median(pil)
    result = {"batched_views_per_s": round(a), "pil_views_per_s": round(b), "ratio": round(a / b, 2),
              "device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
              "repeats": args.repeats, "load_avg_1min": round(os.getloadavg()[0], 2)}
    print(f"batched views/s per repeat: {[round(v) for v in batched]}")
    print(f"PIL views/s per repeat:     {[round(v) for v in pil]}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
