"""The paper's linear protocol, data-parallel (unmix_ray/evaluation/linear_distributed.py): two gloo ranks
train the classifier exactly as one process taking the global batch does, the test split is scored
whole (padding of the last shard not counted), one worker gives the in-memory ``linear_paper``'s
numbers, and ``jobs/linear_eval.py --workers N`` runs it as a Ray Train job over streamed ImageNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from unmix_ray.augment import normalize
from unmix_ray.collectives import world_size
from unmix_ray.config import CONFIG_DIR, DatasetConfig, EvalConfig, build
from unmix_ray.data import image_loader
from unmix_ray.evaluation import linear_paper, linear_paper_sharded, paper_recipe, per_worker_batch
from unmix_ray.evaluation.features import eval_view
from unmix_ray.evaluation.knn import topk_accuracy
from unmix_ray.evaluation.linear import paper_classifier
from unmix_ray.evaluation.linear_distributed import (
    check_streamed_views,
    encode_shard,
    fit_sharded,
    paper_views,
)

from .test_methods_distributed import spawn

CPU = torch.device("cpu")
SIDE, CLASSES = 8, 4
# Whole-image crops (scale 1 of a square image) of left-right symmetric images: the training views do
# not depend on the random draws, so runs that draw differently (one rank, two ranks) see the same data.
RECIPE = paper_recipe(EvalConfig(paper_recipe="imagenet", paper_epochs=8, paper_batch_size=16, paper_lr=3.0,
                                 paper_crop_scale=(1.0, 1.0)), "levels")


def write_levels(root, n_train: int, n_test: int, seed: int = 0) -> DatasetConfig:
    """An in-memory dataset (``unmix_ray.data.npz``) of 8x8 grey images, symmetric left-right: the class
    sets the brightness, noise blurs the classes into each other."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        y = torch.randint(0, CLASSES, (n,), generator=g)
        half = 40.0 + 55.0 * y.view(-1, 1, 1, 1) + 45 * torch.randn(n, 1, SIDE, SIDE // 2, generator=g)
        x = torch.cat([half, half.flip(-1)], -1).clamp(0, 255).round().to(torch.uint8)
        np.savez(root / f"{split}.npz", images=x.numpy(), labels=y.numpy())
    return build(DatasetConfig, {"name": "levels", "root": str(root), "loader": "unmix_ray.data.npz",
                                 "num_classes": CLASSES, "channels": 1, "image_size": SIDE, "crop_size": SIDE,
                                 "mean": [0.5], "std": [0.25]})


def encoder() -> nn.Module:
    """A frozen-to-be conv net whose BatchNorm has running statistics of its own (not 0 / 1)."""
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def run_sharded(ds: DatasetConfig, rank: int) -> dict:
    """The protocol's pieces as ``linear_paper_sharded`` puts them together, with the classifier kept."""
    world, net = world_size(), encoder()
    train_view, test_view = paper_views(ds, RECIPE, CPU, seed=0, worker=rank)
    test_batches = image_loader(ds, "test", 5, mode="eval", rank=rank, world_size=world)
    test = encode_shard(net, test_batches, test_view, test_batches.sampler.n, CPU)
    train = image_loader(ds, "train", per_worker_batch(RECIPE, world), mode="train", rank=rank, world_size=world)
    clf, opt, sched = paper_classifier(6, CLASSES, RECIPE, CPU, seed=0)
    res = fit_sharded(net, clf, opt, sched, RECIPE.epochs, train, train_view, test, CPU)
    return {"history": res.history, "weight": clf.weight.detach().clone(), "bias": clf.bias.detach().clone(),
            "training": net.training, "n_test": test.n}


def _two_ranks(rank: int, ds: DatasetConfig, out: str) -> None:
    result = run_sharded(ds, rank)
    if rank == 0:
        torch.save(result, out)


def by_definition(ds: DatasetConfig) -> tuple[list[tuple[float, float]], torch.Tensor, torch.Tensor]:
    """One process, from the protocol's definition: features of the whole images, one SGD step per
    global batch of the loader's seeded order (the tail short of a batch dropped), lr 3 x0.1 after
    epochs 5 and 6 of 8, top-1 / top-5 over the whole test split after each epoch."""
    train, test = (np.load(f"{ds.root}/{s}.npz") for s in ("train", "test"))
    net = encoder().eval()
    with torch.no_grad():
        ftr = net(normalize(torch.from_numpy(train["images"]), ds.mean, ds.std))
        # imagenet recipe's test view: shorter side to round(8 * 256 / 224) = 9 px, centre 8 px
        fte = net(eval_view(torch.from_numpy(test["images"]), ds.mean, ds.std, SIDE, resize=9))
    ytr, yte = torch.from_numpy(train["labels"]), torch.from_numpy(test["labels"])
    torch.manual_seed(0)
    clf = nn.Linear(6, CLASSES)
    nn.init.normal_(clf.weight, std=0.01)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=3.0, momentum=0.9, weight_decay=0.0)
    history = []
    for epoch in range(8):
        for group in opt.param_groups:
            group["lr"] = 3.0 * 0.1 ** ((epoch >= 5) + (epoch >= 6))
        order = np.random.default_rng([0, epoch]).permutation(len(ytr))
        for b in range(len(ytr) // 16):
            idx = torch.from_numpy(order[b * 16:(b + 1) * 16])
            loss = F.cross_entropy(clf(ftr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            scores = clf(fte)
        history.append((topk_accuracy(scores, yte, 1), topk_accuracy(scores, yte, 5)))
    return history, clf.weight.detach(), clf.bias.detach()


def test_two_ranks_train_the_classifier_as_one_process_taking_the_global_batch(tmp_path):
    # 56 training images: 3 global batches of 16 per epoch (8 dropped); 13 test images: rank 1's shard
    # of 7 ends with a wrapped copy of image 0, which must not be counted.
    ds = write_levels(tmp_path, n_train=56, n_test=13)
    out = tmp_path / "rank0.pt"
    spawn(_two_ranks, ds, str(out))
    two = torch.load(out, weights_only=False)
    one = run_sharded(ds, 0)
    history, weight, bias = by_definition(ds)

    for run in (one, two):
        torch.testing.assert_close(run["weight"], weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run["bias"], bias, rtol=1e-5, atol=1e-6)
        assert np.array(run["history"]) == pytest.approx(np.array(history), abs=1e-4)
        assert run["n_test"] == 13 and not run["training"]
    assert len({h[0] for h in history}) > 1  # the test accuracy moves: the comparison sees the training
    assert all(h[1] == 100.0 for h in history)  # top-5 of 4 classes: every image


def test_one_worker_gives_linear_paper_s_numbers_on_an_in_memory_dataset(tmp_path):
    # One global batch per epoch, so the batch order (the one thing the two draw differently) is moot.
    ds = write_levels(tmp_path, n_train=16, n_test=40, seed=1)
    train, test = (np.load(tmp_path / f"{s}.npz") for s in ("train", "test"))
    reference = linear_paper(encoder(), 6, torch.from_numpy(train["images"]), torch.from_numpy(train["labels"]),
                             torch.from_numpy(test["images"]), torch.from_numpy(test["labels"]), CLASSES, ds.mean,
                             ds.std, SIDE, RECIPE, CPU, seed=0, chunk=64)
    net = encoder()
    res = linear_paper_sharded(net, 6, ds, RECIPE, CPU, seed=0, chunk=7)
    assert np.array(res.history) == pytest.approx(np.array(reference.history), abs=1e-4)
    assert res.metrics() == pytest.approx(reference.metrics(), abs=1e-4)  # a test image is 2.5 points
    assert len({h[0] for h in res.history}) > 1
    assert not net.training


def test_the_global_batch_must_split_evenly_and_streamed_views_must_be_the_loader_s():
    imagenet = paper_recipe(EvalConfig(), "imagenet")
    assert per_worker_batch(imagenet, 8) == 32 and per_worker_batch(imagenet, 1) == 256
    with pytest.raises(ValueError, match="256 does not split evenly over 3 workers"):
        per_worker_batch(imagenet, 3)
    data = yaml.safe_load((CONFIG_DIR / "datasets" / "imagenet.yaml").read_text())
    ds = build(DatasetConfig, data)
    check_streamed_views(ds, imagenet)  # resize 256, centre 224, train crops at scale 0.08-1: the loader's
    with pytest.raises(ValueError, match="scale"):
        check_streamed_views(ds, paper_recipe(EvalConfig(paper_crop_scale=(0.2, 1.0)), "imagenet"))
    with pytest.raises(ValueError, match="image_size=224"):  # the CIFAR recipe tests on uncropped images
        check_streamed_views(ds, paper_recipe(EvalConfig(paper_recipe="cifar"), "imagenet"))


# ------------------------------------------------------------------ jobs/linear_eval.py on ImageNet


@pytest.fixture
def imagenet_run(tmp_path):
    """A finished ImageNet trial's run and checkpoint (a resnet_narrow SimCLR at initialisation), its
    config the real ImageNet's; the data is a 4-class fixture in ImageNet's own layout."""
    from mlflow.tracking import MlflowClient

    from unmix_ray import checkpoint
    from unmix_ray.compose import load_sweep
    from unmix_ray.methods import build_method
    from unmix_ray.models import build_backbone
    from unmix_ray.optim import build_optimizer, build_scheduler
    from unmix_ray.orchestration import tracking

    from .conftest import ROOT
    from .fixtures import write_fixture

    data = write_fixture("imagenet", tmp_path / "imagenet", n_per_class=4, num_classes=4)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        "grid.dataset=[imagenet]", "grid.mixture=[none]", "grid.seed=[0]", "untrained_reference=false",
        "train.epochs=1", "train.batch_size=8"])
    trial = sweep.trials[0]
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, sweep.config.experiment)
    parent = tracking.start_sweep_run(client, exp_id, sweep.name, "s-1", 1)
    run_id = tracking.start_trial_run(client, exp_id, parent, "s-1", trial)
    torch.manual_seed(0)
    method = build_method(trial.method, build_backbone(trial.train.backbone, 3))
    optimizer = build_optimizer(method, trial.method.optim, 8)
    ckpt = checkpoint.write(method, optimizer, build_scheduler(optimizer, trial.method.optim, 1, 2, 8), 1, run_id,
                            trial.to_dict(), tmp_path / "epoch=0001")
    client.set_tag(run_id, tracking.TAG_CHECKPOINT, str(ckpt))
    client.set_terminated(run_id, "FINISHED")
    return uri, run_id, data


def here(data) -> list[str]:
    """--set for the fixture: where it lies, its 4 classes, decoding in the loading process."""
    return ["--set", f"dataset.root={data}", "--set", "dataset.num_classes=4", "--set", "dataset.decode_workers=0"]


def test_the_paper_protocol_on_streamed_imagenet_asks_for_workers(imagenet_run, monkeypatch, capsys):
    from .test_report import load_job

    uri, run_id, data = imagenet_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = load_job("linear_eval")
    assert job.main(["--run-id", run_id, "--protocol", "paper", *here(data)]) == 2
    assert "pass --workers N" in capsys.readouterr().err
    assert job.main(["--run-id", run_id, "--protocol", "paper", "--workers", "3", *here(data)]) == 2
    assert "256 does not split evenly over 3 workers" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        job.main(["--run-id", run_id, "--protocol", "paper", "--use-gpu"])
    assert usage.value.code == 2 and "go with --workers N" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.ray
def test_imagenet_paper_protocol_runs_on_two_cpu_workers_and_lands_in_the_run(imagenet_run, tmp_path, monkeypatch,
                                                                             capsys):
    from mlflow.tracking import MlflowClient

    from .test_report import load_job

    uri, run_id, data = imagenet_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = load_job("linear_eval")
    assert job.main(["--run-id", run_id, "--protocol", "paper", "--workers", "2", "--cpus-per-worker", "1",
                     "--storage-path", str(tmp_path / "ray"), *here(data),
                     "--set", "eval.paper_epochs=2", "--set", "eval.paper_batch_size=8",
                     "--set", "eval.feature_batch_size=4"]) == 0
    printed = json.loads([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1])
    run = MlflowClient(uri).get_run(run_id)
    metrics = run.data.metrics
    for name in ("linear_paper_top1_last", "linear_paper_top1_best", "linear_paper_top5_last",
                 "linear_paper_top5_best", "linear_paper_best_epoch"):
        assert metrics[name] == pytest.approx(printed[name], abs=1e-3)
    # 16 val images over 2 workers: a top-1 is a whole number of images out of 16; top-5 of 4 classes is all.
    for name in ("linear_paper_top1_last", "linear_paper_top1_best"):
        hits = metrics[name] * 16 / 100
        assert abs(hits - round(hits)) < 1e-6 and 0 <= hits <= 16
    assert metrics["linear_paper_top5_last"] == metrics["linear_paper_top5_best"] == 100.0
    assert metrics["linear_paper_best_epoch"] in (1.0, 2.0)
    assert metrics["linear_paper_top1_best"] >= metrics["linear_paper_top1_last"]
    tag = run.data.tags["unmix.protocol.linear_paper"]
    assert "linear (paper, imagenet recipe)" in tag and "2 epochs, batch 8" in tag and "x0.1 at epochs 1, 2" in tag
    assert "distributed on 2 workers, batch 4 per worker" in tag and "last pretraining epoch" in tag
    assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "linear_paper_top1_last")] == [1]
