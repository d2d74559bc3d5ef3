"""Evaluation inside a trial (the per-epoch kNN monitor and the final evaluation), and of a checkpoint.

``evaluate`` runs any of the protocols ``knn``, ``fast`` (linear on cached features) and ``paper``
(the paper's augmented linear protocol) on a method's frozen backbone and returns the metrics with
the protocol tags that describe them; ``final_evaluation`` (end of every trial) and
``jobs/linear_eval.py`` (a finished run, again, from its checkpoint) both use it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from unmix_ray.config import DatasetConfig, EvalConfig, TrialConfig
from unmix_ray.data import STREAMED, image_loader, load_split
from unmix_ray.evaluation import (
    PROTOCOL_TAG,
    eval_view,
    knn_predict,
    knn_protocol,
    linear_paper,
    linear_probe,
    linear_protocol,
    paper_protocol,
    paper_recipe,
    topk_accuracy,
)
from unmix_ray.tracking import RunLogger

PROTOCOLS = ("knn", "fast", "paper")


class _Features(torch.nn.Module):
    """A method's ``features`` as a module, so the paper protocol can freeze it."""

    def __init__(self, method: torch.nn.Module):
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.features(x)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def split_features(method: torch.nn.Module, ds: DatasetConfig, split: str, subset: int | None, seed: int,
                   device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen backbone features and labels of ``split`` (a seeded ``subset``), in dataset order, on the CPU.

    Every rank of a training run extracts its own shard (streamed datasets such as ImageNet through
    their DataLoader workers) and the shards are gathered on every rank, so the work is spread over
    the workers and all ranks must call this together."""
    rank, world = _rank_world()
    loader = image_loader(ds, split, batch_size, mode="eval", seed=seed, rank=rank, world_size=world,
                          subset=subset)
    feats, labels = [], []
    for images, y in loader:
        feats.append(method.features(eval_view(images.to(device, non_blocking=True), ds.mean, ds.std,
                                               ds.crop_size)).float())
        labels.append(y.to(device))
    f, y = torch.cat(feats), torch.cat(labels)
    if world > 1:  # shards are round-robin and padded by wrapping: interleave them, drop the padding
        n = loader.sampler.n
        fs, ys = [torch.empty_like(f) for _ in range(world)], [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(fs, f.contiguous())
        dist.all_gather(ys, y.contiguous())
        f, y = torch.stack(fs, 1).flatten(0, 1)[:n], torch.stack(ys, 1).flatten(0, 1)[:n]
    return f.cpu(), y.cpu()


def monitor_knn(method: torch.nn.Module, trial: TrialConfig, device: torch.device) -> float | None:
    """The per-epoch kNN monitor: the training split (subsetted like pretraining) as the bank, the test
    split as queries. Every rank extracts its shard; the score is returned on rank 0 (None elsewhere)."""
    ds, ev = trial.dataset, trial.eval
    with frozen(method):
        fb, yb = split_features(method, ds, ds.train_split, ds.train_subset, trial.seed, device,
                                ev.feature_batch_size)
        ft, yt = split_features(method, ds, ds.test_split, ds.test_subset, trial.seed, device,
                                ev.feature_batch_size)
    if _rank_world()[0] != 0:
        return None
    return topk_accuracy(knn_predict(fb, yb, ft, ds.num_classes, ev.knn_k, ev.knn_t), yt)


@contextmanager
def frozen(method: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``method`` in eval mode with no gradients, its mode and ``requires_grad`` flags restored after."""
    was_training = method.training
    flags = [(p, p.requires_grad) for p in method.parameters()]
    method.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield method
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        method.train(was_training)


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # unmix.protocol.<key>: the protocol of each metric


def evaluate(method: torch.nn.Module, trial: TrialConfig, device: torch.device, protocols: tuple[str, ...],
             eval_config: EvalConfig | None = None, encoder_at: str = "last pretraining epoch") -> Evaluation:
    """Run ``protocols`` (any of ``knn``, ``fast``, ``paper``) on the frozen backbone of ``method``.

    The training split is the labelled bank / probe training set in full; the test split is subsetted
    as the dataset config says (``test_subset``), seeded by the trial's seed. The method is evaluated
    in eval mode (BN running statistics) with no gradients; its mode and flags are restored after."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; known: {', '.join(PROTOCOLS)}")
    ds, ev = trial.dataset, eval_config or trial.eval
    if "paper" in protocols and ds.name in STREAMED:
        raise ValueError(f"the paper linear protocol holds {ds.name} in memory, which it cannot; use 'fast'")
    with frozen(method):
        return _evaluate(method, trial, ds, ev, device, protocols, encoder_at)


def _evaluate(method: torch.nn.Module, trial: TrialConfig, ds: DatasetConfig, ev: EvalConfig,
              device: torch.device, protocols: tuple[str, ...], encoder_at: str) -> Evaluation:
    out = Evaluation()
    if "knn" in protocols or "fast" in protocols:  # every rank extracts its shard; rank 0 evaluates
        ftr, ytr = split_features(method, ds, ds.train_split, None, trial.seed, device, ev.feature_batch_size)
        fte, yte = split_features(method, ds, ds.test_split, ds.test_subset, trial.seed, device,
                                  ev.feature_batch_size)
        if _rank_world()[0] != 0:
            return out
        if "knn" in protocols:
            scores = knn_predict(ftr, ytr, fte, ds.num_classes, ev.knn_k, ev.knn_t)
            out.metrics |= {"knn_top1": topk_accuracy(scores, yte, 1), "knn_top5": topk_accuracy(scores, yte, 5)}
            bank = f"{ds.train_split} split ({len(ytr)} images)"
            out.tags[PROTOCOL_TAG + "knn"] = knn_protocol(ev, bank=bank, encoder_at=encoder_at)
        if "fast" in protocols:
            lin = linear_probe(ftr, ytr, fte, yte, ds.num_classes, ev, seed=trial.seed)
            out.metrics |= {"linear_top1": lin.top1, "linear_top5": lin.top5}
            out.tags[PROTOCOL_TAG + "linear"] = linear_protocol(ev, encoder_at=encoder_at)
    if "paper" in protocols and _rank_world()[0] == 0:
        train = load_split(ds, ds.train_split)
        test = load_split(ds, ds.test_split).subset(ds.test_subset, trial.seed)
        recipe = paper_recipe(ev, ds.name)
        features = _Features(method)
        with torch.no_grad():
            dim = features(torch.zeros(2, ds.channels, ds.crop_size, ds.crop_size, device=device)).shape[1]
        res = linear_paper(features, dim, train.images, train.labels, test.images, test.labels, ds.num_classes,
                           ds.mean, ds.std, ds.crop_size, recipe, device, seed=trial.seed,
                           chunk=ev.feature_batch_size)
        out.metrics |= res.metrics()
        out.tags[PROTOCOL_TAG + "linear_paper"] = paper_protocol(recipe, encoder_at=encoder_at)
    return out


def final_evaluation(method: torch.nn.Module, trial: TrialConfig, device: torch.device,
                     logger: RunLogger | None) -> dict[str, float]:
    """kNN and the configured linear protocols (``eval.linear_protocols``) on the full train split."""
    ev, ds = trial.eval, trial.dataset
    result = evaluate(method, trial, device, ("knn",) + tuple(ev.linear_protocols))
    if logger:
        logger.log(result.metrics, step=trial.train.epochs)
        bank = f"{ds.train_split} split" + (f" (seeded subset of {ds.train_subset})" if ds.train_subset else "")
        logger.set_tags(result.tags | {
            PROTOCOL_TAG + "monitor_knn": knn_protocol(ev, bank=bank, encoder_at="each epoch"),
        })
    return result.metrics


def read_checkpoint(location: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """The ``state.pt`` of a Ray Train checkpoint written by the training loop: ``location`` is the
    checkpoint folder or the file itself, local or ``s3://bucket/key`` (an S3-compatible endpoint from
    ``endpoint_url``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; credentials from the
    environment). Tensors are loaded onto the CPU."""
    from unmix_ray.train_loop import CHECKPOINT_FILE

    name = location if location.endswith(".pt") else f"{location.rstrip('/')}/{CHECKPOINT_FILE}"
    if "://" not in name:
        return torch.load(name, map_location="cpu", weights_only=False)
    import pyarrow.fs

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if name.startswith("s3://") and endpoint:
        fs = pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme=urlsplit(endpoint).scheme or "https",
                                     region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
        path = name.removeprefix("s3://")
    else:
        fs, path = pyarrow.fs.FileSystem.from_uri(name)
    with fs.open_input_stream(path) as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def method_from_checkpoint(state: dict[str, Any], trial: TrialConfig, device: torch.device) -> torch.nn.Module:
    """The pretrained method (backbone and heads) of a checkpoint, on ``device``."""
    from unmix_ray.methods import build_method
    from unmix_ray.models import build_backbone

    method = build_method(trial.method, build_backbone(trial.train.backbone, trial.dataset.channels))
    method.load_state_dict(state["model"])
    return method.to(device)


def checkpoint_epoch_text(state: dict[str, Any], trial: TrialConfig) -> str:
    """What the protocol strings say about the encoder: the same words as the trial's own evaluation
    when the checkpoint is the last epoch, so re-evaluated numbers group with the trial's."""
    epoch = int(state.get("epoch", trial.train.epochs))
    if epoch >= trial.train.epochs:
        return "last pretraining epoch"
    return f"checkpoint of pretraining epoch {epoch} of {trial.train.epochs}"
