"""What a sweep prints: one line when a trial starts, one per trial and epoch (loss, images/s, the kNN
monitor), one when it ends, and a status count after each end. Ray's and Tune's own chatter stays in
their log files unless ``--verbose``."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from ray import tune


def _when() -> str:
    return time.strftime("%H:%M:%S")


class ConsoleReporter(tune.Callback):
    def __init__(self, total: int):
        self.total = total
        self.ended: Counter = Counter()

    def _print(self, text: str) -> None:
        print(f"[{_when()}] {text}", flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._print(f"{trial.config['run']}: started")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        epoch = result.get("epoch")
        parts = [f"loss {result['loss']:.4f}"] if "loss" in result else []
        if "images_per_s" in result:
            parts.append(f"{result['images_per_s']:.0f} images/s")
        if "monitor_knn_top1" in result:
            parts.append(f"kNN monitor {result['monitor_knn_top1']:.2f}%")
        if "knn_top1" in result:
            parts.append(f"final kNN {result['knn_top1']:.2f}%")
        if "linear_top1" in result:
            parts.append(f"linear {result['linear_top1']:.2f}%")
        self._print(f"{trial.config['run']}: epoch {epoch}: " + ", ".join(parts))

    def _ended(self, trial: Any, outcome: str, trials: list) -> None:
        self.ended[outcome] += 1
        running = sum(t.status == "RUNNING" for t in trials if t is not trial)  # Tune has not updated it yet
        done = ", ".join(f"{n} {k}" for k, n in sorted(self.ended.items()))
        self._print(f"{trial.config['run']}: {outcome}   [{done}; {running} running, "
                    f"{self.total - sum(self.ended.values()) - running} waiting]")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "ended", trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "failed", trials)
