"""BatchNorm variants on one process: split BN (MoCo CIFAR's ``bn_splits``) against its definition, the
global-BN conversion and its ``auto`` rule, and the config checks. Two-process global BN and the
averaging of running statistics are in test_methods_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unmix_ray.collectives import shuffled_forward
from unmix_ray.compose import compose_sweep
from unmix_ray.config import ConfigError, MethodConfig
from unmix_ray.methods import METHODS, build_method
from unmix_ray.models import NarrowResNet
from unmix_ray.norm import (
    GlobalBatchNorm,
    SplitBatchNorm,
    global_batchnorm,
    running_stats,
    split_batchnorm,
    wants_global_bn,
)

SPLITS = 8


def _bn_with_stats(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def test_split_bn_normalises_each_interleaved_split_like_plain_bn():
    c = 3
    plain = _bn_with_stats(c)
    split = split_batchnorm(nn.Sequential(_bn_with_stats(c)), SPLITS)[0]
    assert isinstance(split, SplitBatchNorm) and split.splits == SPLITS
    x = torch.randn(32, c, 5, 5) * 2 + 1
    out = split.train()(x)
    means, variances = [], []
    for k in range(SPLITS):  # split k holds samples k, k + 8, k + 16, ... (n mod 8)
        part = x[k::SPLITS]
        expected = F.batch_norm(part, None, None, plain.weight, plain.bias, True, 0.0, plain.eps)
        torch.testing.assert_close(out[k::SPLITS], expected, rtol=1e-5, atol=1e-5)
        one = _bn_with_stats(c).train()  # plain BN from the same running statistics, on this split alone
        one(part)
        means.append(one.running_mean)
        variances.append(one.running_var)
    # Running statistics: the mean over splits of what plain BN would keep for each split.
    torch.testing.assert_close(split.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack(variances).mean(0))
    assert int(split.num_batches_tracked) == 1
    # Not plain BN over the whole batch.
    assert not torch.allclose(out, plain.train()(x), atol=1e-3)
    # Eval: plain BN with the running statistics, any batch size.
    x3 = torch.randn(3, c, 5, 5)
    split.eval()
    reference = F.batch_norm(x3, split.running_mean, split.running_var, split.weight, split.bias, False, 0.0,
                             split.eps)
    torch.testing.assert_close(split(x3), reference)


def test_split_bn_refuses_a_batch_it_cannot_split():
    bn = SplitBatchNorm(4, SPLITS).train()
    with pytest.raises(ValueError, match="does not divide into 8 splits"):
        bn(torch.randn(12, 4, 3, 3))


def _moco(**params) -> nn.Module:
    torch.manual_seed(0)
    base = {"proj_dim": 16, "queue_size": 64} | params
    return build_method(MethodConfig(name="moco_v1", params=base), NarrowResNet(3, 8)).train()


def test_moco_bn_splits_keeps_the_flip_shortcut_exact():
    m = _moco(bn_splits=SPLITS)
    splits = [b for b in m.modules() if isinstance(b, SplitBatchNorm)]
    n_bn = sum(isinstance(b, nn.BatchNorm2d) for b in _moco().modules())
    assert len(splits) == n_bn and all(b.splits == SPLITS for b in splits)  # query and key encoders
    mix = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    # Reversing 16 samples maps split k (n mod 8 = k) onto split 7 - k: the same groups, so each
    # sample's embedding is unchanged and embed(flip(mix)) == flip(embed(mix)).
    torch.testing.assert_close(m.outputs(mix.flip(0)).q, m.outputs(mix).q.flip(0), rtol=1e-5, atol=1e-6)
    # A permutation that mixes the splits does change the embeddings: the statistics are per split.
    swap = torch.tensor([1, 0, *range(2, 16)])  # samples 0 and 1 trade splits
    assert not torch.allclose(m.outputs(mix[swap]).q, m.outputs(mix).q[swap], atol=1e-4)
    # And split BN is not plain BN.
    assert not torch.allclose(m.outputs(mix).q, _moco().outputs(mix).q, atol=1e-4)


def test_one_process_key_shuffle_with_split_bn_returns_keys_in_order():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    per_sample = nn.Sequential(nn.Flatten(), nn.Linear(192, 5))
    torch.testing.assert_close(shuffled_forward(per_sample, x, local=True), per_sample(x))
    split = nn.Sequential(SplitBatchNorm(3, SPLITS), nn.Flatten())
    unshuffled = split(x)
    shuffled = shuffled_forward(split, x, local=True)  # other split-mates: other statistics
    assert shuffled.shape == unshuffled.shape and not torch.allclose(shuffled, unshuffled, atol=1e-3)
    torch.testing.assert_close(shuffled_forward(split, x), unshuffled)  # local=False: no permutation


def test_global_bn_conversion_keeps_parameters_and_statistics():
    model = build_method(MethodConfig(name="simclr", params={"proj_hidden": 16, "proj_dim": 8}), NarrowResNet(3, 4))
    params = list(model.parameters())
    stats = [t.clone() for t in running_stats(model)]
    n_bn = len(stats) // 2
    converted = global_batchnorm(model, torch.device("cpu"))
    assert converted is model
    assert sum(isinstance(m, GlobalBatchNorm) for m in model.modules()) == n_bn
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))  # optimisers still hold
    for a, b in zip(running_stats(model), stats, strict=True):
        assert torch.equal(a, b)
    # One process: global BN is plain BN.
    x = torch.randn(6, 3, 16, 16)
    torch.manual_seed(0)
    plain = build_method(MethodConfig(name="simclr", params={"proj_hidden": 16, "proj_dim": 8}), NarrowResNet(3, 4))
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(model.train().outputs(x), plain.train().outputs(x))
    # On CUDA the conversion is torch's SyncBatchNorm (it needs no device to convert).
    gpu = global_batchnorm(NarrowResNet(3, 4), torch.device("cuda"))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in gpu.modules()) == len(running_stats(gpu)) // 2 == 12
    with pytest.raises(ValueError, match="split BatchNorm"):
        global_batchnorm(split_batchnorm(NarrowResNet(3, 4), 2), torch.device("cpu"))


def test_auto_sync_bn_follows_each_method_reference():
    for name in ("simclr", "byol", "swav"):
        assert METHODS[name].global_bn and wants_global_bn("auto", METHODS[name].global_bn, 2)
    for name in ("moco_v1", "moco_v2"):  # shuffle-BN instead
        assert not wants_global_bn("auto", METHODS[name].global_bn, 4)
        assert wants_global_bn(True, METHODS[name].global_bn, 4)
    assert not wants_global_bn(False, True, 4)
    assert not wants_global_bn(True, True, 1)  # one worker: its BN already sees the whole batch


def _sweep(train: dict, params: dict) -> dict:
    return {"name": "t", "grid": {"dataset": ["fashion_mnist"], "method": ["moco_v1"], "mixture": ["none"]},
            "train": {"backbone": "resnet_narrow"} | train, "methods": {"moco_v1": {"params": params}}}


def test_bn_splits_is_checked_against_the_batch_when_a_sweep_is_composed():
    ok = compose_sweep(_sweep({"batch_size": 64, "num_workers": 2}, {"bn_splits": 8}))
    assert ok.trials[0].method.params["bn_splits"] == 8
    with pytest.raises(ConfigError) as e:
        compose_sweep(_sweep({"batch_size": 40, "num_workers": 2}, {"bn_splits": 8}))
    assert "bn_splits 8 does not divide the per-worker batch 20" in str(e.value)
    with pytest.raises(ConfigError, match="cannot be combined with sync_bn"):
        compose_sweep(_sweep({"batch_size": 64, "sync_bn": True}, {"bn_splits": 8}))
    with pytest.raises(ConfigError, match="bn_splits"):
        compose_sweep(_sweep({"batch_size": 64}, {"bn_splits": 0}))
