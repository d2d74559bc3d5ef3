"""kNN and the linear probe on feature sets with known answers."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from unmix_ray.config import EvalConfig
from unmix_ray.evaluation import (
    eval_view,
    knn_predict,
    linear_paper,
    linear_probe,
    metric_protocol,
    paper_protocol,
    paper_recipe,
    topk_accuracy,
)
from unmix_ray.evaluation.knn import query_chunk


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


def test_query_chunk_keeps_the_similarity_matrix_within_the_budget():
    imagenet = 1_281_167
    chunk = query_chunk(imagenet, torch.float32, 1 << 30)
    assert chunk == 209  # 2**30 // (1_281_167 * 4)
    assert chunk * imagenet * 4 <= 1 << 30 < (chunk + 1) * imagenet * 4
    assert query_chunk(imagenet, torch.bfloat16, 1 << 30) == 419
    assert query_chunk(imagenet, torch.float32, 10) == 1  # at least one query, whatever the budget


class MatmulShapes(TorchDispatchMode):
    """Records the shape of every matrix product's result."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.matmul, torch.ops.aten.bmm):
            self.shapes.append(tuple(out.shape))
        return out


class HostReads(TorchFunctionMode):
    """Records every call that reads a tensor's values back to the host."""

    READS = {"item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_knn_in_chunks_gives_the_scores_of_one_chunk():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(300, 16, generator=g), torch.randint(0, 7, (300,), generator=g)
    queries = torch.randn(37, 16, generator=g)
    whole = knn_predict(bank, labels, queries, 7, k=20, t=0.1, chunk=37)
    for chunk in (1, 5, 36):  # equal up to float rounding (amplified by exp(sim / t))
        assert torch.allclose(knn_predict(bank, labels, queries, 7, k=20, t=0.1, chunk=chunk), whole, rtol=1e-5)
    # The chunk chosen from the memory budget: 4 queries' rows of 300 float32 similarities fit in 4800 bytes.
    shapes = MatmulShapes()
    with shapes:
        budgeted = knn_predict(bank, labels, queries, 7, k=20, t=0.1, budget_bytes=4 * 300 * 4)
    assert torch.allclose(budgeted, whole, rtol=1e-5)
    assert shapes.shapes == [(4, 300)] * 9 + [(1, 300)]


def test_knn_reads_nothing_back_to_the_host():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(100, 8, generator=g), torch.randint(0, 3, (100,), generator=g)
    reads = HostReads()
    with reads:
        knn_predict(bank, labels, torch.randn(20, 8, generator=g), 3, k=10, chunk=3)
    assert reads.calls == []


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


def test_knn_top5_on_a_toy_set_with_a_known_answer():
    angles = torch.deg2rad(torch.tensor([0.0, 10.0, 20.0, 30.0, 40.0, 50.0]))
    train = torch.stack([angles.cos(), angles.sin()], dim=1)  # class c at 10c degrees
    labels = torch.arange(6)
    queries = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # at 0 degrees: classes rank 0, 1, ..., 5
    scores = knn_predict(train, labels, queries, num_classes=6, k=6, t=0.1)
    assert scores[0].argsort(descending=True).tolist() == [0, 1, 2, 3, 4, 5]
    truth = torch.tensor([4, 5, 0])  # 5th, 6th and 1st by score
    assert topk_accuracy(scores, truth, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(scores, truth, 5) == pytest.approx(200 / 3)


class LevelEncoder(torch.nn.Module):
    """A fixed encoder for images whose class is their brightness level: a BatchNorm with set running
    statistics (eval mode must use them), then ReLU(x - threshold) per threshold, average-pooled."""

    def __init__(self, thresholds: list[float]):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(1)
        self.bn.running_mean.fill_(0.25)
        self.bn.running_var.fill_(4.0)
        self.register_buffer("thresholds", torch.tensor(thresholds).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(x) - self.thresholds).mean(dim=(2, 3))


def level_images(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    levels = torch.tensor([30.0, 100.0, 170.0, 240.0])
    y = torch.randint(0, 4, (n,), generator=g)
    x = levels[y].view(-1, 1, 1, 1) + 12 * torch.randn(n, 1, 8, 8, generator=g)
    return x.clamp(0, 255).round().to(torch.uint8), y


def test_paper_protocol_learns_tiny_images_with_a_frozen_encoder():
    g = torch.Generator().manual_seed(0)
    (xtr, ytr), (xte, yte) = level_images(400, g), level_images(200, g)
    mean, std = (0.5,), (0.25,)
    normalised = [(v / 255 - 0.5) / 0.25 for v in (65.0, 135.0, 205.0)]  # between the levels
    encoder = LevelEncoder([-3.0, *[(v - 0.25) / 2.0 for v in normalised]])
    encoder.train()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    recipe = paper_recipe(EvalConfig(paper_epochs=6), "fashion_mnist")
    assert (recipe.name, recipe.lr, recipe.batch_size, recipe.schedule) == ("cifar", 0.3, 32, "cosine")
    res = linear_paper(encoder, 4, xtr, ytr, xte, yte, 4, mean, std, 8, recipe, torch.device("cpu"), seed=0,
                       chunk=100)
    assert len(res.history) == 6 and 1 <= res.best_epoch <= 6
    assert res.top1_last >= 95.0 and res.top5_last == 100.0
    assert res.top1_best >= res.top1_last and res.top1_best == max(h[0] for h in res.history)
    assert not encoder.training  # BN in eval mode: running statistics untouched
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert set(res.metrics()) == {"linear_paper_top1_last", "linear_paper_top5_last", "linear_paper_top1_best",
                                  "linear_paper_top5_best", "linear_paper_best_epoch"}


def test_paper_recipes_and_their_protocol_strings():
    imagenet = paper_recipe(EvalConfig(), "imagenet")
    assert (imagenet.lr, imagenet.batch_size, imagenet.epochs, imagenet.schedule) == (30.0, 256, 100, "step")
    assert imagenet.test_resize_px(224) == 256
    text = paper_protocol(imagenet)
    assert "lr 30" in text and "x0.1 at epochs 60, 80" in text and "batch 256" in text
    short = paper_recipe(EvalConfig(paper_epochs=10, paper_lr=0.1, paper_recipe="imagenet"), "cifar10")
    assert (short.epochs, short.lr, short.batch_size) == (10, 0.1, 256)
    assert "x0.1 at epochs 6, 8" in paper_protocol(short)
    cifar = paper_protocol(paper_recipe(EvalConfig(), "cifar10"))
    assert "lr 0.3" in cifar and "cosine" in cifar and "batch 32" in cifar and "best epoch" in cifar
    assert eval_view(torch.zeros(2, 3, 16, 20, dtype=torch.uint8), (0.5,) * 3, (0.2,) * 3, 8, resize=9).shape == (
        2, 3, 8, 8)
    assert metric_protocol("linear_paper_top1_best", "P").startswith("P; reported: the best epoch")
    assert metric_protocol("knn_top1", "K") == "K"
