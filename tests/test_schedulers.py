"""ASHA per (dataset, method) cell: a trial is compared only with trials of its own cell."""

from __future__ import annotations

from dataclasses import dataclass, field

from ray.tune.schedulers import ASHAScheduler

from unmix_ray.compose import load_sweep
from unmix_ray.orchestration.schedulers import PerCellASHA, scheduler

from .conftest import ROOT


@dataclass
class FakeTrial:
    trial_id: str
    config: dict = field(default_factory=dict)


def run_rung(sched, trials: dict[str, float]) -> dict[str, str]:
    """Every trial reports its kNN monitor at epoch 1 (ASHA's first rung, grace period 1)."""
    for name in trials:
        sched.on_trial_add(None, FakeTrial(name, {"run": name}))
    return {name: sched.on_trial_result(None, FakeTrial(name, {"run": name}),
                                        {"epoch": 1, "monitor_knn_top1": value})
            for name, value in trials.items()}


# Two datasets of very different difficulty: each cell's better trial must survive its own cell.
TRIALS = {"c10-a": 90.0, "c10-b": 88.0, "c100-a": 60.0, "c100-b": 62.0}
CELLS = {"c10-a": "cifar10/simclr", "c10-b": "cifar10/simclr", "c100-a": "cifar100/simclr",
         "c100-b": "cifar100/simclr"}


def test_one_pool_cuts_the_harder_dataset_and_per_cell_brackets_do_not():
    kwargs = dict(metric="monitor_knn_top1", mode="max", grace_period=1, reduction_factor=2)
    # ASHA keeps the first result of a rung and cuts what falls below the rung's median so far.
    pooled = run_rung(ASHAScheduler(time_attr="epoch", max_t=100, brackets=1, **kwargs), TRIALS)
    assert pooled == {"c10-a": "CONTINUE", "c10-b": "STOP", "c100-a": "STOP", "c100-b": "STOP"}
    per_cell = run_rung(PerCellASHA(CELLS, **kwargs), TRIALS)
    assert per_cell == {"c10-a": "CONTINUE", "c10-b": "STOP", "c100-a": "CONTINUE", "c100-b": "CONTINUE"}


def test_a_two_dataset_sweep_gets_one_bracket_set_per_cell():
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        "grid.dataset=[fashion_mnist, cifar10]", "grid.method=[simclr, byol]", "tune.asha={grace_period: 1}"])
    sched = scheduler(sweep)
    for t in sweep.trials:
        sched.on_trial_add(None, FakeTrial(t.run_name, {"run": t.run_name}))
    assert set(sched.by_cell) == {"fashion_mnist/simclr", "fashion_mnist/byol", "cifar10/simclr", "cifar10/byol"}
