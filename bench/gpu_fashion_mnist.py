"""The real training of bench/gpu.py: SimCLR + Un-Mix on Fashion-MNIST from its idx files with the training
loop's ``Pretrainer``, the kNN of the encoder before and after, and bf16 against fp32 losses over the
first steps from the same weights, batches, augmentation and mixture draws."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from gpu_timing import UNMIX, Clock, device_batches, trainer_for

from unmix_ray.config import CONFIG_DIR, DatasetConfig, EvalConfig, build, read_yaml
from unmix_ray.data import fashion_mnist
from unmix_ray.evaluation import extract_features, frozen, knn_predict, topk_accuracy
from unmix_ray.evaluation.features import Features
from unmix_ray.step import Pretrainer, epoch_seed
from unmix_ray.unmix import MixtureSampler

# Largest relative difference of a step's loss, bf16 autocast against fp32 (TF32 off), over the first
# steps: bf16 keeps 8 bits of mantissa (~0.4% per rounding); 5 steps of SimCLR + Un-Mix differed by 0.3%
# on a CPU. 2% leaves room for other kernels; a larger gap in the first steps is no longer rounding.
BF16_TOLERANCE = 0.02


@contextmanager
def no_tf32() -> Iterator[None]:
    """Full fp32 convolutions and matrix products (no TF32) inside the block. Uses torch's per-backend
    ``fp32_precision`` flags where it has them: setting those and reading the older ``allow_tf32`` ones
    is an error, and torch's own code may read either."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if cudnn_conv is not None and hasattr(cudnn_conv, "fp32_precision"):
        flags, off = [(torch.backends.cuda.matmul, "fp32_precision"), (cudnn_conv, "fp32_precision")], "ieee"
    else:
        flags, off = [(torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")], False
    before = [getattr(owner, name) for owner, name in flags]
    for owner, name in flags:
        setattr(owner, name, off)
    try:
        yield
    finally:
        for (owner, name), value in zip(flags, before):
            setattr(owner, name, value)


def fashion_mnist_run(trials: dict, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict:
    """SimCLR + Un-Mix on Fashion-MNIST from its idx files; kNN before and after; bf16 against fp32."""
    ds = build(DatasetConfig, read_yaml(CONFIG_DIR / "datasets" / "fashion_mnist.yaml") | {"root": args.fashion_mnist},
               "datasets/fashion_mnist.yaml")
    simclr = trials["cifar10", "simclr"]
    optim = simclr.method.optim.model_copy(update={"warmup_epochs": min(0.5, args.fm_epochs / 2)})
    trial = simclr.model_copy(update={"dataset": ds, "method": simclr.method.model_copy(update={"optim": optim})})
    train, test = (fashion_mnist.load(args.fashion_mnist, s).subset(n, 0)
                   for s, n in (("train", args.fm_train), ("test", args.fm_test)))
    xtr, ytr, xte, yte = (t.to(device) for t in (train.images, train.labels, test.images, test.labels))
    ev, batch = EvalConfig(), args.fm_batch
    steps = xtr.shape[0] // batch

    def knn_top1(trainer: Pretrainer) -> float:
        with frozen(trainer.method):
            enc = Features(trainer.method)
            fb, ft = (extract_features(enc, x, ds.mean, ds.std, ds.crop_size, device, ev.feature_batch_size)
                      for x in (xtr, xte))
        return round(topk_accuracy(knn_predict(fb, ytr, ft, ds.num_classes, ev.knn_k, ev.knn_t), yte), 2)

    # bf16 against fp32 (no TF32): the same weights, batches, augmentation and mixture draws.
    compare = {}
    for precision in ("fp32", "bf16"):
        with no_tf32() if precision == "fp32" else nullcontext():
            trainer = trainer_for(trial, device, precision, False, batch, ds.crop_size, args.fm_backbone, 1,
                                  (steps, args.fm_epochs))
            mixer = MixtureSampler(UNMIX, seed=1)
            batches = device_batches(xtr, batch, args.fm_compare_steps, seed=1)
            compare[precision] = [round(trainer.epoch([b], mixer, device, i, steps)[0].item(), 5)
                                  for i, b in enumerate(batches)]
    rel = [abs(b - f) / max(abs(f), 1e-6) for f, b in zip(compare["fp32"], compare["bf16"])]

    trainer = trainer_for(trial, device, "bf16", False, batch, ds.crop_size, args.fm_backbone, 0,
                          (steps, args.fm_epochs))
    untrained = knn_top1(trainer)
    losses, seconds = [], 0.0
    for epoch in range(args.fm_epochs):
        trainer.augment.g.manual_seed(epoch_seed(0, 0, epoch, 0))
        mixer = MixtureSampler(UNMIX, seed=epoch_seed(0, 0, epoch, 1))
        batches = device_batches(xtr, batch, steps, seed=epoch)
        dt, loss = clock.once(partial(trainer.epoch, batches, mixer, device, epoch * steps, args.fm_epochs * steps))
        seconds += dt
        losses.append(round(loss[0].item(), 4))
        print(f"  fashion-mnist epoch {epoch + 1}/{args.fm_epochs}: loss {losses[-1]:.4f} ({dt:.1f} s)", flush=True)
    return {"backbone": args.fm_backbone, "method": "simclr", "mixture": "both@0.5", "precision": "bf16",
            "train_images": xtr.shape[0], "test_images": xte.shape[0], "batch": batch, "epochs": args.fm_epochs,
            "epoch_losses": losses, "images_per_s": round(steps * batch * args.fm_epochs / seconds, 1),
            "knn_top1_untrained": untrained, "knn_top1_pretrained": knn_top1(trainer),
            "bf16_vs_fp32": {"steps": args.fm_compare_steps, "fp32_loss": compare["fp32"],
                             "bf16_loss": compare["bf16"], "max_rel_diff": round(max(rel), 5),
                             "tolerance": BF16_TOLERANCE}}
