"""Early stopping for sweeps: ASHA (Li et al., 2020) on a per-epoch metric, with one set of brackets
per (dataset, method) cell, so a trial is only ever compared with trials of its own cell (a CIFAR-100
trial is never cut for scoring below CIFAR-10 ones)."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from unmix_ray.config import Sweep

MAX_T = 10**6  # the epochs each trial runs come from its own config; ASHA only cuts


class PerCellASHA(FIFOScheduler):
    """An ``ASHAScheduler`` per cell; ``cells`` maps each trial's run name to its cell. Tune's trial
    queue stays first in, first out, as with a plain ASHA."""

    def __init__(self, cells: dict[str, str], metric: str, mode: str, grace_period: int, reduction_factor: float,
                 time_attr: str = "epoch"):
        super().__init__()
        self._cells = cells
        self._kwargs = dict(time_attr=time_attr, metric=metric, mode=mode, grace_period=grace_period,
                            reduction_factor=reduction_factor, max_t=MAX_T)
        self._metric, self._mode = metric, mode
        self.by_cell: dict[str, ASHAScheduler] = {}

    def cell_scheduler(self, trial: Any) -> ASHAScheduler:
        cell = self._cells[trial.config["run"]]
        if cell not in self.by_cell:
            self.by_cell[cell] = ASHAScheduler(**self._kwargs)
        return self.by_cell[cell]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return not (metric or mode)  # set at construction

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self.cell_scheduler(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self.cell_scheduler(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.cell_scheduler(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.cell_scheduler(trial).on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.cell_scheduler(trial).on_trial_error(tune_controller, trial)

    def debug_string(self) -> str:
        return "\n".join(f"{cell}: {s.debug_string()}" for cell, s in sorted(self.by_cell.items()))


def scheduler(sweep: Sweep) -> TrialScheduler | None:
    """The sweep's early-stopping scheduler, if ``tune.asha`` asks for one."""
    a = sweep.config.tune.asha
    if a is None:
        return None
    cells = {t.run_name: f"{t.dataset.name}/{t.method.name}" for t in sweep.trials}
    return PerCellASHA(cells, a.metric, a.mode, a.grace_period, a.reduction_factor)
