"""kNN on the representation each method's reference monitored: MoCo's normalised head output (the
authors' kNN monitor), every other method's backbone features; the protocol string says which."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from unmix_ray.compose import compose_sweep
from unmix_ray.config import EvalConfig
from unmix_ray.data import load_split
from unmix_ray.evaluation import (
    PROTOCOL_TAG,
    evaluate,
    extract_features,
    frozen,
    knn_predict,
    knn_protocol,
    monitor_knn,
    topk_accuracy,
)
from unmix_ray.methods import build_method
from unmix_ray.models import NarrowResNet, build_backbone

from .fixtures import write_fixture

PARAMS = {"moco_v1": {"proj_dim": 16, "queue_size": 64}, "simclr": {"proj_hidden": 16, "proj_dim": 8}}
CPU = torch.device("cpu")


def test_knn_features_are_moco_s_normalised_head_output_and_otherwise_the_backbone():
    x = torch.randn(6, 3, 16, 16)
    torch.manual_seed(0)
    moco = build_method(_method("moco_v1"), NarrowResNet(3, 8)).eval()
    with torch.no_grad():
        expected = F.normalize(moco.projector(moco.backbone(x)), dim=1)
        got = moco.knn_features(x)
        assert got.shape == (6, 16) and moco.features(x).shape == (6, 64)  # linear protocols: the backbone
        torch.testing.assert_close(got, expected)
        torch.testing.assert_close(got.norm(dim=1), torch.ones(6))
        torch.testing.assert_close(got, moco.outputs(x).q)  # the query encoder's output
    assert "query encoder's L2-normalised 16-d head output" in moco.knn_representation
    simclr = build_method(_method("simclr"), NarrowResNet(3, 8)).eval()
    with torch.no_grad():
        assert torch.equal(simclr.knn_features(x), simclr.backbone(x))
    assert simclr.knn_representation == "frozen backbone features"


def _method(name: str):
    from unmix_ray.config import MethodConfig

    return MethodConfig(name=name, params=PARAMS[name])


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_fixture("cifar10", tmp_path_factory.mktemp("cifar10"), 3)


def _trial(method: str, root):
    sweep = compose_sweep({
        "name": "t", "grid": {"dataset": ["cifar10"], "method": [method], "mixture": ["none"]},
        "untrained_reference": False, "train": {"backbone": "resnet_narrow", "batch_size": 8},
        "eval": {"knn_k": 5, "knn_t": 0.1, "feature_batch_size": 16},
        "datasets": {"cifar10": {"root": str(root)}}, "methods": {method: {"params": PARAMS[method]}}})
    return sweep.trials[0]


def _knn_by_hand(encode, trial) -> tuple[torch.Tensor, tuple[float, float]]:
    ds, ev = trial.dataset, trial.eval
    train, test = load_split(ds, "train"), load_split(ds, "test")
    ftr = extract_features(encode, train.images, ds.mean, ds.std, ds.crop_size, CPU)
    fte = extract_features(encode, test.images, ds.mean, ds.std, ds.crop_size, CPU)
    scores = knn_predict(ftr, train.labels, fte, ds.num_classes, ev.knn_k, ev.knn_t)
    return ftr, (topk_accuracy(scores, test.labels, 1), topk_accuracy(scores, test.labels, 5))


@pytest.mark.parametrize("name", ["moco_v1", "simclr"])
def test_final_knn_and_monitor_use_the_method_s_knn_representation(name, cifar_root, monkeypatch):
    trial = _trial(name, cifar_root)
    torch.manual_seed(0)
    method = build_method(trial.method, build_backbone(trial.train.backbone, 3))
    banks = []  # the training features each kNN ran on

    def spy(train_feats, *args, **kwargs):
        banks.append(train_feats)
        return knn_predict(train_feats, *args, **kwargs)

    monkeypatch.setattr(sys.modules["unmix_ray.evaluation.evaluate"], "knn_predict", spy)
    result = evaluate(method, trial, CPU, ("knn",))
    monitor = monitor_knn(method, trial, CPU)
    with frozen(method):
        bank, scores = _knn_by_hand(method.knn_features, trial)
    assert (result.metrics["knn_top1"], result.metrics["knn_top5"]) == pytest.approx(scores)
    assert monitor == pytest.approx(scores[0])  # no train_subset: the same bank
    assert len(banks) == 2
    for used in banks:
        torch.testing.assert_close(used, bank, rtol=1e-5, atol=1e-6)
    tag = result.tags[PROTOCOL_TAG + "knn"]
    if name == "moco_v1":
        assert bank.shape[1] == 16  # the head output, not the backbone features
        torch.testing.assert_close(bank.norm(dim=1), torch.ones(len(bank)))
        assert "cosine on the frozen query encoder's L2-normalised 16-d head output" in tag
    else:
        assert bank.shape[1] == method.backbone.feature_dim
        assert "cosine on frozen backbone features" in tag
    assert method.training  # evaluation left the method as it found it


def test_knn_protocol_names_its_representation():
    ev = EvalConfig(knn_k=200, knn_t=0.1)
    assert "cosine on frozen backbone features" in knn_protocol(ev, bank="train split")
    text = knn_protocol(ev, bank="train split", representation="the head output")
    assert text.startswith("weighted kNN k=200 t=0.1 cosine on the head output, bank=train split")
