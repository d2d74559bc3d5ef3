"""Evaluation inside a trial: the per-epoch kNN monitor and the final kNN + linear evaluation."""

from __future__ import annotations

import torch

from unmix_ray.config import TrialConfig
from unmix_ray.data import load_split
from unmix_ray.evaluation import (
    extract_features,
    knn_predict,
    knn_protocol,
    linear_probe,
    linear_protocol,
    topk_accuracy,
)
from unmix_ray.tracking import RunLogger


def _encoder(method: torch.nn.Module):
    def encode(x: torch.Tensor) -> torch.Tensor:
        return method.features(x)
    return encode


def monitor_knn(method: torch.nn.Module, trial: TrialConfig, device: torch.device) -> float:
    """The per-epoch kNN monitor: the training split (subsetted like pretraining) as the bank, the test
    split as queries."""
    ds, ev = trial.dataset, trial.eval
    bank = load_split(ds, ds.train_split).subset(ds.train_subset, trial.seed)
    test = load_split(ds, ds.test_split).subset(ds.test_subset, trial.seed)
    was_training = method.training
    method.eval()
    fb = extract_features(_encoder(method), bank.images, ds.mean, ds.std, ds.crop_size, device)
    ft = extract_features(_encoder(method), test.images, ds.mean, ds.std, ds.crop_size, device)
    method.train(was_training)
    return topk_accuracy(knn_predict(fb, bank.labels, ft, ds.num_classes, ev.knn_k, ev.knn_t), test.labels)


def final_evaluation(method: torch.nn.Module, trial: TrialConfig, device: torch.device,
                     logger: RunLogger | None) -> dict[str, float]:
    """kNN and linear probe on once-extracted features of the full train and test splits."""
    ds, ev = trial.dataset, trial.eval
    train = load_split(ds, ds.train_split)
    test = load_split(ds, ds.test_split).subset(ds.test_subset, trial.seed)
    method.eval()
    ftr = extract_features(_encoder(method), train.images, ds.mean, ds.std, ds.crop_size, device)
    fte = extract_features(_encoder(method), test.images, ds.mean, ds.std, ds.crop_size, device)
    scores = knn_predict(ftr, train.labels, fte, ds.num_classes, ev.knn_k, ev.knn_t)
    lin = linear_probe(ftr, train.labels, fte, test.labels, ds.num_classes, ev, seed=trial.seed)
    results = {"knn_top1": topk_accuracy(scores, test.labels, 1), "knn_top5": topk_accuracy(scores, test.labels, 5),
               "linear_top1": lin.top1, "linear_top5": lin.top5}
    if logger:
        logger.log(results, step=trial.train.epochs)
        logger.set_tags({
            "unmix.protocol.knn": knn_protocol(ev, bank=f"{ds.train_split} split ({len(train)} images)"),
            "unmix.protocol.linear": linear_protocol(ev),
            "unmix.protocol.monitor_knn": knn_protocol(ev, bank="pretraining images"),
        })
    return results
