"""Linear evaluation: the ``fast`` protocol against the ``paper`` protocol, on one pretrained encoder.

The encoder is a narrow ResNet (``NarrowResNet(1, 16)``) pretrained in-process with SimCLR (the
project's ``Pretrainer``, no mixture) on a Fashion-MNIST subset for a few epochs. Both protocols then
evaluate that same frozen encoder in the same run, on the same training images and the full test split:

- fast: features extracted once (batched, no augmentation), then a linear layer on the cached
  features (Adam, cosine, ``--linear-epochs`` at ``--linear-batch``): ``unmix_ray.evaluation.linear_probe``;
- paper: the CIFAR recipe of the paper (SGD lr 0.3, cosine, batch 32, RandomResizedCrop + flip as a
  batched augmentation, every epoch re-encoding fresh views), ``--paper-epochs`` (default 60) epochs
  instead of 100 so that it runs in minutes on a CPU: ``unmix_ray.evaluation.linear_paper``.

Defaults: 20000 probe training images (a seeded subset; --train-images 0 for all 60000), the full
10000-image test split, fast protocol at EvalConfig's defaults (100 epochs, batch 512). About 3.5
minutes on 2 CPU cores.

    python bench/linear_eval.py                       # CPU, 2 threads
    python bench/linear_eval.py --paper-crop-scale 1 1  # the paper protocol with flips only
    python bench/linear_eval.py --device cuda --train-images 0 --paper-epochs 100

Last line: one JSON object {"time_ratio": paper_s / fast_s, "top1_diff": fast - paper (last epoch), ...}.
Times exclude pretraining. Goal: time_ratio >= 20 with |top1_diff| <= 1.5 points.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unmix_ray.augment import BatchAugment  # noqa: E402
from unmix_ray.config import AugmentConfig, EvalConfig, MethodConfig, MixtureConfig, OptimConfig  # noqa: E402
from unmix_ray.data import fashion_mnist  # noqa: E402
from unmix_ray.data.loader import MemoryBatches  # noqa: E402
from unmix_ray.evaluation import (  # noqa: E402
    extract_features,
    linear_paper,
    linear_probe,
    linear_protocol,
    paper_protocol,
    paper_recipe,
)
from unmix_ray.methods import build_method  # noqa: E402
from unmix_ray.models import NarrowResNet  # noqa: E402
from unmix_ray.optim import build_optimizer, build_scheduler  # noqa: E402
from unmix_ray.step import Pretrainer  # noqa: E402
from unmix_ray.unmix import MixtureSampler  # noqa: E402

MEAN, STD, CROP = (0.2860,), (0.3530,), 28


def pretrain(root: str, images: int, epochs: int, batch: int, device: torch.device) -> torch.nn.Module:
    """SimCLR on ``images`` Fashion-MNIST training images; returns the backbone, in eval mode."""
    data = fashion_mnist.load(root, "train").subset(images, 0)
    torch.manual_seed(0)
    optim = OptimConfig(name="adam", lr=3e-3, weight_decay=1e-6, warmup_epochs=0.5)
    method = build_method(MethodConfig(name="simclr", params={"proj_hidden": 512, "proj_dim": 64}, optim=optim),
                          NarrowResNet(1, 16)).to(device)
    batches = MemoryBatches(data, batch, 0, 1, seed=0, shuffle=True, drop_last=True)
    optimizer = build_optimizer(method, optim, batch)
    scheduler = build_scheduler(optimizer, optim, len(batches), epochs, batch)
    augment = BatchAugment(AugmentConfig(jitter=(0.4, 0.4, 0.0, 0.0), gray_p=0.0), CROP, MEAN, STD,
                           torch.Generator(device).manual_seed(0))
    trainer = Pretrainer(method, method, optimizer, scheduler, augment)
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        loss = trainer.epoch(batches, MixtureSampler(MixtureConfig(type="none"), seed=epoch), device,
                             step0=epoch * len(batches), total_steps=epochs * len(batches)).tolist()
        print(f"pretraining epoch {epoch + 1}/{epochs}: loss {loss[0]:.3f}", flush=True)
    return method.backbone.eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pretrain-images", type=int, default=8192)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--pretrain-batch", type=int, default=256)
    ap.add_argument("--train-images", type=int, default=20000, help="probe training images (0: all 60000)")
    ap.add_argument("--test-images", type=int, default=None, help="test images (default: all 10000)")
    ap.add_argument("--linear-epochs", type=int, default=EvalConfig().linear_epochs)
    ap.add_argument("--linear-batch", type=int, default=EvalConfig().linear_batch_size)
    ap.add_argument("--paper-epochs", type=int, default=60)
    ap.add_argument("--paper-crop-scale", type=float, nargs=2, default=EvalConfig().paper_crop_scale,
                    help="RandomResizedCrop scale of the paper protocol's training views")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    encoder = pretrain(args.root, args.pretrain_images, args.pretrain_epochs, args.pretrain_batch, device)
    train = fashion_mnist.load(args.root, "train").subset(args.train_images or None, 1)
    test = fashion_mnist.load(args.root, "test").subset(args.test_images, 1)
    config = EvalConfig(linear_epochs=args.linear_epochs, linear_batch_size=args.linear_batch,
                        paper_epochs=args.paper_epochs, paper_crop_scale=tuple(args.paper_crop_scale))

    sync()
    start = time.perf_counter()
    ftr = extract_features(encoder, train.images, MEAN, STD, CROP, device, config.feature_batch_size)
    fte = extract_features(encoder, test.images, MEAN, STD, CROP, device, config.feature_batch_size)
    extract_s = time.perf_counter() - start
    fast = linear_probe(ftr, train.labels, fte, test.labels, 10, config, seed=0)
    sync()
    fast_s = time.perf_counter() - start
    print(f"fast:  {fast_s:7.1f} s (extraction {extract_s:.1f} s), top-1 {fast.top1:.2f}  "
          f"[{linear_protocol(config)}]", flush=True)

    recipe = paper_recipe(config, "fashion_mnist")
    start = time.perf_counter()
    paper = linear_paper(encoder, encoder.feature_dim, train.images, train.labels, test.images, test.labels, 10,
                         MEAN, STD, CROP, recipe, device, seed=0, chunk=config.feature_batch_size)
    sync()
    paper_s = time.perf_counter() - start
    print(f"paper: {paper_s:7.1f} s, top-1 last {paper.top1_last:.2f}, best {paper.top1_best:.2f} "
          f"(epoch {paper.best_epoch})  [{paper_protocol(recipe)}]", flush=True)
    print("paper top-1 per epoch:", [round(h[0], 2) for h in paper.history])

    ratio, diff = paper_s / fast_s, fast.top1 - paper.top1_last
    result = {
        "time_ratio": round(ratio, 1), "top1_diff": round(diff, 2),
        "top1_diff_vs_best": round(fast.top1 - paper.top1_best, 2),
        "fast_s": round(fast_s, 1), "paper_s": round(paper_s, 1), "fast_top1": round(fast.top1, 2),
        "paper_top1_last": round(paper.top1_last, 2), "paper_top1_best": round(paper.top1_best, 2),
        "paper_best_epoch": paper.best_epoch, "paper_epochs": recipe.epochs, "linear_epochs": config.linear_epochs,
        "linear_batch": config.linear_batch_size, "train_images": len(train), "test_images": len(test),
        "device": str(device), "threads": torch.get_num_threads(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "goal_met": bool(ratio >= 20 and abs(diff) <= 1.5),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
