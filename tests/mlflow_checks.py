"""What the fault and interruption tests read back from MLflow: epochs logged, one complete run per trial."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient


def wait_for(predicate, timeout_s: float, what: str, every_s: float = 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every_s)


def statuses(uri: str) -> dict[str, str]:
    """Run name -> status of every run in the experiment."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    return {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])} if exp else {}


def epochs_logged(uri: str, name: str) -> list[int]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], f"tags.`unmix.trial` = '{name}'")
    return sorted({m.step for r in runs for m in client.get_metric_history(r.info.run_id, "loss")})


def assert_one_complete_run(uri: str, name: str, epochs: int) -> None:
    """One FINISHED run for the trial with every epoch, epoch 1 logged once (a restart resumed from a
    checkpoint instead of starting over; the epoch a fault interrupts may be logged again, its checkpoint
    can lag its metrics), and the final evaluation in it."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    runs = client.search_runs([exp.experiment_id], f"tags.`unmix.trial` = '{name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    assert runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")]
    assert sorted(set(steps)) == list(range(1, epochs + 1)) and steps.count(1) == 1, steps
    assert "linear_top1" in runs[0].data.metrics
