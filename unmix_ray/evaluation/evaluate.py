"""Evaluation of a method's frozen encoder under any of the protocols ``knn``, ``fast`` (linear on
cached features) and ``paper`` (the paper's augmented linear protocol): the per-epoch kNN monitor,
the final evaluation of every trial, and the re-evaluation of a checkpoint (``jobs/linear_eval.py``).
Each returns the metrics with the protocol strings that describe them.

The linear protocols read the backbone features (``SSLMethod.features``); kNN reads the method's
``knn_features``, which for MoCo is the query encoder's normalised head output, as the authors'
monitor did. Both come from one extraction: the kNN head is applied to the gathered backbone features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from unmix_ray.collectives import rank
from unmix_ray.config import DatasetConfig, EvalConfig, TrialConfig
from unmix_ray.data import is_streamed, load_split
from unmix_ray.evaluation.features import Features, frozen, split_features
from unmix_ray.evaluation.knn import knn_predict, topk_accuracy
from unmix_ray.evaluation.linear import linear_paper, linear_probe
from unmix_ray.evaluation.protocols import (
    PROTOCOL_TAG,
    knn_protocol,
    linear_protocol,
    paper_protocol,
    paper_recipe,
)
from unmix_ray.methods.base import SSLMethod

PROTOCOLS = ("knn", "fast", "paper")


def monitor_knn(method: SSLMethod, trial: TrialConfig, device: torch.device) -> float | None:
    """The per-epoch kNN monitor on ``method.knn_features``: the training split (subsetted like
    pretraining) as the bank, the test split as queries. Every rank extracts its shard; the score is
    returned on rank 0 (None elsewhere)."""
    ds, ev = trial.dataset, trial.eval
    with frozen(method):
        encoder = Features(method)
        fb, yb = split_features(encoder, ds, ds.train_split, ds.train_subset, trial.seed, device,
                                ev.feature_batch_size)
        ft, yt = split_features(encoder, ds, ds.test_split, ds.test_subset, trial.seed, device,
                                ev.feature_batch_size)
        if rank() != 0:
            return None
        fb, ft = knn_head(method, fb, ev.feature_batch_size), knn_head(method, ft, ev.feature_batch_size)
    return topk_accuracy(knn_predict(fb, yb, ft, ds.num_classes, ev.knn_k, ev.knn_t), yt)


@torch.no_grad()
def knn_head(method: SSLMethod, features: torch.Tensor, chunk: int) -> torch.Tensor:
    """``method.knn_head`` on backbone ``features``, ``chunk`` rows at a time (the method is frozen)."""
    return torch.cat([method.knn_head(f).float() for f in features.split(chunk)])


@dataclass
class Evaluation:
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # unmix.protocol.<key>: the protocol of each metric


def evaluate(method: SSLMethod, trial: TrialConfig, device: torch.device, protocols: tuple[str, ...],
             eval_config: EvalConfig | None = None, encoder_at: str = "last pretraining epoch") -> Evaluation:
    """Run ``protocols`` (any of ``knn``, ``fast``, ``paper``) on the frozen encoder of ``method``
    (kNN on ``knn_features``, the linear protocols on the backbone features).

    The training split is the labelled bank / probe training set in full; the test split is subsetted
    as the dataset config says (``test_subset``), seeded by the trial's seed. The method is evaluated
    in eval mode (BN running statistics) with no gradients; its mode and flags are restored after.
    Every rank of a training run calls this together; the numbers come back on rank 0."""
    unknown = set(protocols) - set(PROTOCOLS)
    if unknown:
        raise ValueError(f"unknown protocol(s) {sorted(unknown)}; known: {', '.join(PROTOCOLS)}")
    ds, ev = trial.dataset, eval_config or trial.eval
    if "paper" in protocols and is_streamed(ds):
        raise ValueError(f"the paper linear protocol holds {ds.name} in memory here, which it cannot: run it "
                         "distributed over the streamed data (jobs/linear_eval.py --protocol paper --workers N), "
                         "or use 'fast'")
    with frozen(method):
        return _evaluate(Features(method), trial, ds, ev, device, protocols, encoder_at)


def _evaluate(encoder: Features, trial: TrialConfig, ds: DatasetConfig, ev: EvalConfig,
              device: torch.device, protocols: tuple[str, ...], encoder_at: str) -> Evaluation:
    out = Evaluation()
    if "knn" in protocols or "fast" in protocols:  # every rank extracts its shard; rank 0 evaluates
        ftr, ytr = split_features(encoder, ds, ds.train_split, None, trial.seed, device, ev.feature_batch_size)
        fte, yte = split_features(encoder, ds, ds.test_split, ds.test_subset, trial.seed, device,
                                  ev.feature_batch_size)
        if rank() != 0:
            return out
        if "knn" in protocols:
            method = encoder.method
            ktr, kte = knn_head(method, ftr, ev.feature_batch_size), knn_head(method, fte, ev.feature_batch_size)
            scores = knn_predict(ktr, ytr, kte, ds.num_classes, ev.knn_k, ev.knn_t)
            out.metrics |= {"knn_top1": topk_accuracy(scores, yte, 1), "knn_top5": topk_accuracy(scores, yte, 5)}
            bank = f"{ds.train_split} split ({len(ytr)} images)"
            out.tags[PROTOCOL_TAG + "knn"] = knn_protocol(ev, bank=bank, encoder_at=encoder_at,
                                                          representation=method.knn_representation)
        if "fast" in protocols:
            lin = linear_probe(ftr, ytr, fte, yte, ds.num_classes, ev, seed=trial.seed)
            out.metrics |= {"linear_top1": lin.top1, "linear_top5": lin.top5}
            out.tags[PROTOCOL_TAG + "linear"] = linear_protocol(ev, encoder_at=encoder_at)
    if "paper" in protocols and rank() == 0:
        train = load_split(ds, ds.train_split)
        test = load_split(ds, ds.test_split).subset(ds.test_subset, trial.seed)
        recipe = paper_recipe(ev, ds.name)
        with torch.no_grad():
            dim = encoder(torch.zeros(2, ds.channels, ds.crop_size, ds.crop_size, device=device)).shape[1]
        res = linear_paper(encoder, dim, train.images, train.labels, test.images, test.labels, ds.num_classes,
                           ds.mean, ds.std, ds.crop_size, recipe, device, seed=trial.seed,
                           chunk=ev.feature_batch_size)
        out.metrics |= res.metrics()
        out.tags[PROTOCOL_TAG + "linear_paper"] = paper_protocol(recipe, encoder_at=encoder_at)
    return out


def method_from_checkpoint(state: dict[str, Any], trial: TrialConfig, device: torch.device) -> SSLMethod:
    """The pretrained method (backbone and heads) of a checkpoint's state, on ``device``."""
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
