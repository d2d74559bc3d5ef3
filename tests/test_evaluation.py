"""kNN and the linear probe on feature sets with known answers."""

from __future__ import annotations

import pytest
import torch

from unmix_ray.config import EvalConfig
from unmix_ray.evaluation import knn_predict, linear_probe, topk_accuracy


def test_weighted_knn_on_a_toy_set_with_a_known_answer():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]])
    scores = knn_predict(train, labels, test, num_classes=3, k=2, t=0.1)
    assert scores.argmax(1).tolist() == [0, 1, 2]
    # the weight of each neighbour is exp(cos / t): check one score exactly
    q = torch.nn.functional.normalize(test[:1], dim=1)
    t_ = torch.nn.functional.normalize(train[:2], dim=1)
    expected = (q @ t_.T / 0.1).exp().sum()
    assert scores[0, 0].item() == pytest.approx(expected.item(), rel=1e-5)
    assert topk_accuracy(scores, torch.tensor([0, 1, 0]), 1) == pytest.approx(200 / 3)


def test_knn_weights_prefer_closer_neighbours_over_counts():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.2]])
    assert knn_predict(train, labels, test, 2, k=3, t=0.05).argmax(1).item() == 0  # one close beats two far
    assert knn_predict(train, labels, test, 2, k=3, t=100.0).argmax(1).item() == 1  # flat weights: majority


def test_linear_probe_separates_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    ytr, yte = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (200,), generator=g)
    xtr = centres[ytr] + torch.randn(800, 16, generator=g)
    xte = centres[yte] + torch.randn(200, 16, generator=g)
    res = linear_probe(xtr, ytr, xte, yte, 4, EvalConfig(linear_epochs=20, linear_batch_size=64), seed=0)
    assert res.top1 >= 99.0 and res.top5 == 100.0 and res.best_top1 >= res.top1


def test_linear_probe_is_at_chance_on_noise():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(600, 8, generator=g), torch.randint(0, 4, (600,), generator=g)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], 4, EvalConfig(linear_epochs=10), seed=0)
    assert res.top1 < 40.0
