"""Every registered method, composed from its YAML recipe, trains through the same epoch code the Ray
Train loop runs (Pretrainer), on real Fashion-MNIST, with each mixture type."""

from __future__ import annotations

import pytest
import torch

from unmix_ray.augment import BatchAugment
from unmix_ray.compose import load_sweep
from unmix_ray.data import fashion_mnist
from unmix_ray.data.loader import MemoryBatches
from unmix_ray.methods import METHODS, build_method
from unmix_ray.models import build_backbone
from unmix_ray.optim import build_optimizer, build_scheduler
from unmix_ray.step import Pretrainer
from unmix_ray.unmix import MixtureSampler

from .conftest import ROOT


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_an_epoch_with_every_mixture(method, fashion_mnist_root):
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        f"grid.method=[{method}]", "grid.mixture=[none, mixup, cutmix, both]", "grid.seed=[0]",
        "untrained_reference=false", "train.batch_size=32"])
    data = fashion_mnist.load(fashion_mnist_root, "test").subset(128, 0)
    for trial in sweep.trials:
        torch.manual_seed(0)
        m = build_method(trial.method, build_backbone(trial.train.backbone, 1))
        batches = MemoryBatches(data, 32, 0, 1, seed=0, shuffle=True, drop_last=True)
        opt = build_optimizer(m, trial.method.optim, 32)
        sched = build_scheduler(opt, trial.method.optim, len(batches), 1, 32)
        augment = BatchAugment(trial.dataset.augment, 28, trial.dataset.mean, trial.dataset.std,
                               torch.Generator().manual_seed(0))
        before = [p.detach().clone() for p in m.parameters() if p.requires_grad]
        loss = Pretrainer(m, m, opt, sched, augment).epoch(batches, MixtureSampler(trial.mixture, 0),
                                                            torch.device("cpu"))
        total, clean, mixed = loss.tolist()
        assert torch.isfinite(loss).all()
        assert total == pytest.approx(clean + mixed, rel=1e-5)
        assert (mixed == 0) == (trial.mixture.type == "none")
        after = [p for p in m.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
