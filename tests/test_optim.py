"""Learning-rate schedules (warm-up in epochs or iterations, cosine, step) and which parameters take
weight decay, checked against their definitions at chosen steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from unmix_ray.config import ConfigError, OptimConfig, build
from unmix_ray.optim import build_optimizer, build_scheduler, lr_factor


def lrs(config: OptimConfig, steps_per_epoch: int, epochs: int, global_batch: int) -> list[float]:
    """The lr of every optimiser step of a run, as the scheduler sets it."""
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, config, global_batch)
    sched = build_scheduler(opt, config, steps_per_epoch, epochs, global_batch)
    out = []
    for _ in range(steps_per_epoch * epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_of_moco_v1():
    """MoCo v1: lr 0.03 for batch 256, x0.1 at epochs 120 and 160 of 200 (epoch e uses
    lr * 0.1 ** #{milestones <= e})."""
    config = OptimConfig(name="sgd", lr=0.03, base_batch_size=256, weight_decay=1e-4, schedule="step",
                         milestones=(120, 160), gamma=0.1)
    spe = 5
    lr = lrs(config, spe, 200, 256)
    for epoch, expected in [(0, 0.03), (119, 0.03), (120, 0.003), (159, 0.003), (160, 0.0003), (199, 0.0003)]:
        for step in (epoch * spe, epoch * spe + spe - 1):
            assert lr[step] == pytest.approx(expected, rel=1e-12), (epoch, step)
    assert lrs(config, spe, 200, 512)[0] == pytest.approx(0.06)  # linear scaling to the batch


def test_warmup_in_iterations_then_step_of_the_harness():
    """SimCLR/BYOL harness: Adam lr 3e-3, 500 warm-up iterations (lr * (i + 1) / 500), then x0.2 at
    epochs 950 and 975 of 1000. Checked on the factor, at CIFAR's 195 steps per epoch."""
    spe, total, warm = 195, 195 * 1000, 500
    milestones = [950 * spe, 975 * spe]

    def factor(step: int) -> float:
        return lr_factor(step, total, warm, "step", 0.0, milestones, 0.2)

    assert factor(0) == pytest.approx(1 / 500)
    assert factor(249) == pytest.approx(250 / 500)
    assert factor(499) == pytest.approx(1.0)
    assert factor(500) == factor(950 * spe - 1) == 1.0
    assert factor(950 * spe) == pytest.approx(0.2)
    assert factor(975 * spe - 1) == pytest.approx(0.2)
    assert factor(975 * spe) == pytest.approx(0.04)
    assert factor(total - 1) == pytest.approx(0.04)


def test_warmup_iters_and_epochs_give_the_same_ramp():
    by_epochs = OptimConfig(name="adam", lr=1e-3, warmup_epochs=2.0, schedule="constant")
    by_iters = OptimConfig(name="adam", lr=1e-3, warmup_iters=20, schedule="constant")
    assert lrs(by_epochs, 10, 4, 256) == lrs(by_iters, 10, 4, 256)
    ramp = lrs(by_iters, 10, 4, 256)
    assert ramp[:20] == pytest.approx([1e-3 * (i + 1) / 20 for i in range(20)])
    assert ramp[20:] == pytest.approx([1e-3] * 20)
    # Iterations do not depend on the epoch length; epochs do.
    assert lrs(by_iters, 40, 1, 256)[19] == pytest.approx(1e-3)
    assert lrs(by_epochs, 40, 1, 256)[19] == pytest.approx(1e-3 * 20 / 80)


def test_cosine_after_warmup_down_to_final_lr_of_swav():
    """SwAV CIFAR: lr 0.6 -> 0.0006, 5 warm-up epochs; the cosine runs over the remaining steps."""
    config = OptimConfig(name="lars", lr=0.6, base_batch_size=128, weight_decay=1e-6, warmup_epochs=5,
                         final_lr=6e-4)
    spe, epochs = 4, 20
    lr = lrs(config, spe, epochs, 128)
    assert lr[0] == pytest.approx(0.6 / 20) and lr[19] == pytest.approx(0.6)
    remaining = spe * epochs - 20
    for t in (0, 17, remaining - 1):
        expected = 6e-4 + (0.6 - 6e-4) * 0.5 * (1 + math.cos(math.pi * t / remaining))
        assert lr[20 + t] == pytest.approx(expected, rel=1e-9), t


def test_schedule_settings_are_validated():
    with pytest.raises(ConfigError, match="warmup_iters: warm-up given twice"):
        build(OptimConfig, {"warmup_iters": 500, "warmup_epochs": 2.56})
    assert build(OptimConfig, {"warmup_iters": 500, "warmup_epochs": 0}).warmup_iters == 500
    with pytest.raises(ConfigError, match="schedule 'step' needs milestones"):
        build(OptimConfig, {"schedule": "step"})
    with pytest.raises(ConfigError, match="only apply to schedule 'step'"):
        build(OptimConfig, {"schedule": "cosine", "milestones": [10]})
    with pytest.raises(ConfigError, match="must increase strictly"):
        build(OptimConfig, {"schedule": "step", "milestones": [160, 120]})
    with pytest.raises(ConfigError, match="gamma"):
        build(OptimConfig, {"schedule": "step", "milestones": [1], "gamma": 0})


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)  # a 4-d weight and a bias
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2, 2)


def one_step_without_gradient(config: OptimConfig, model: nn.Module) -> dict[str, bool]:
    """Which parameters move in one optimiser step whose gradients are all zero: only weight decay
    (``w <- w - lr * wd * w``) can move them."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
            p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    build_optimizer(model, config, 256).step()
    return {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_weight_decay_applies_to_every_parameter_by_default(name):
    config = OptimConfig(name=name, lr=0.1, weight_decay=0.1)
    moved = one_step_without_gradient(config, Net())
    assert all(moved.values()), moved
    model = Net()
    one_step_without_gradient(OptimConfig(name="sgd", lr=0.1, weight_decay=0.1, momentum=0.0), model)
    assert model.bn.weight.detach() == pytest.approx(torch.full((2,), 0.5 - 0.1 * 0.1 * 0.5))


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_norm_and_bias_exclusion_is_opt_in(name):
    config = OptimConfig(name=name, lr=0.1, weight_decay=0.1, wd_exclude_norm_bias=True)
    moved = one_step_without_gradient(config, Net())
    assert moved == {"conv.weight": True, "conv.bias": False, "bn.weight": False, "bn.bias": False,
                     "fc.weight": True, "fc.bias": False}


class Frozen(nn.Module):
    """A model that names a parameter whose gradient is dropped before each step."""

    def __init__(self, frozen: bool):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.frozen = frozen

    def frozen_parameters(self) -> list[torch.Tensor]:
        return list(self.b.parameters()) if self.frozen else []


@pytest.mark.parametrize("name", ["sgd", "adam", "lars"])
def test_frozen_parameters_do_not_move_even_with_decay_and_momentum(name):
    model = Frozen(frozen=True)
    opt = build_optimizer(model, OptimConfig(name=name, lr=0.1, weight_decay=0.1), 256)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        (model.a.weight.sum() + model.b.weight.sum() + model.b.bias.sum() + model.a.bias.sum()).backward()
        opt.step()
    a_w, a_b, b_w, b_b = (not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert a_w and a_b and not b_w and not b_b
    assert all(p.grad is None for p in model.b.parameters())
    model.frozen = False  # released: the same step now moves them
    opt.zero_grad()
    (model.b.weight.sum() + model.b.bias.sum()).backward()
    opt.step()
    assert not torch.equal(model.b.weight, before[2]) and not torch.equal(model.b.bias, before[3])
