"""MLflow bookkeeping: one parent run per sweep, one child run per trial, found again on resume.

Runs are created and finished by the driver side (the sweep and each trial's Tune function); the
rank-0 training worker only logs metrics into the known run id, so a restarted worker keeps writing
into the same run. Tags (``unmix.*``) make runs findable; run names make them readable in the UI.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from unmix_ray.config import TrialConfig

log = logging.getLogger(__name__)

TAG_ROLE, TAG_SWEEP, TAG_SWEEP_ID, TAG_TRIAL = "unmix.role", "unmix.sweep", "unmix.sweep_id", "unmix.trial"
PARENT = "mlflow.parentRunId"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the working directory (absolute, since
    Ray Tune runs trials in other directories)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else client.create_experiment(name)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def find_runs(client: MlflowClient, exp_id: str, **tags: str) -> list:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"])


def start_sweep_run(client: MlflowClient, exp_id: str, sweep_name: str, sweep_id: str, n_trials: int) -> str:
    """The sweep's parent run: found by its sweep id on resume, created otherwise."""
    found = find_runs(client, exp_id, **{TAG_ROLE: "sweep", TAG_SWEEP_ID: sweep_id})
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=sweep_id, tags={
        TAG_ROLE: "sweep", TAG_SWEEP: sweep_name, TAG_SWEEP_ID: sweep_id})
    client.log_param(run.info.run_id, "n_trials", n_trials)
    return run.info.run_id


def trial_tags(trial: TrialConfig, sweep_id: str) -> dict[str, str]:
    return {
        TAG_ROLE: "trial", TAG_SWEEP: trial.sweep, TAG_SWEEP_ID: sweep_id, TAG_TRIAL: trial.run_name,
        "method": trial.method.name, "dataset": trial.dataset.name, "backbone": trial.train.backbone,
        "variant": trial.variant, "mixture_type": trial.mixture.type, "mixture_prob": str(trial.mixture.prob),
        "seed": str(trial.seed), "sweep": trial.sweep,
    }


def start_trial_run(client: MlflowClient, exp_id: str, parent_run_id: str, sweep_id: str,
                    trial: TrialConfig) -> str:
    """The trial's child run: the same run again when a trial is restarted or a sweep resumed."""
    found = find_runs(client, exp_id, **{TAG_SWEEP_ID: sweep_id, TAG_TRIAL: trial.run_name})
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=trial.run_name, tags=trial_tags(trial, sweep_id) | {PARENT: parent_run_id})
    params = [Param(k, str(v)[:6000]) for k, v in flatten(trial.to_dict()).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


class RunLogger:
    """Metrics into one known run id, retried with backoff so a brief tracking-server outage does
    not stop training; what cannot be sent is kept and sent with the next call."""

    def __init__(self, uri: str, run_id: str, retries: int = 3, backoff_s: float = 1.0):
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.retries, self.backoff_s = retries, backoff_s
        self.pending: list[Metric] = []

    def log(self, metrics: dict[str, float], step: int) -> bool:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        return self.flush()

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def flush(self) -> bool:
        for attempt in range(self.retries):
            try:
                for i in range(0, len(self.pending), 500):
                    self.client.log_batch(self.run_id, metrics=self.pending[i:i + 500])
                self.pending = []
                return True
            except Exception as e:  # noqa: BLE001 - any transport error: keep training, retry later
                log.warning("MLflow unreachable (attempt %d/%d, %d metrics buffered): %s",
                            attempt + 1, self.retries, len(self.pending), type(e).__name__)
                time.sleep(self.backoff_s * 2**attempt)
        return False


def redacted(uri: str) -> str:
    """A URI safe to print: any password in it replaced."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return uri
