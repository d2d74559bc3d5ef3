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
from unmix_ray.redact import safe_params

log = logging.getLogger(__name__)

TAG_ROLE, TAG_SWEEP, TAG_SWEEP_ID, TAG_TRIAL = "unmix.role", "unmix.sweep", "unmix.sweep_id", "unmix.trial"
TAG_CHECKPOINT = "unmix.checkpoint"  # the final Ray Train checkpoint (path or s3:// URI)
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
    params = [Param(k, str(v)[:6000]) for k, v in safe_params(flatten(trial.to_dict())).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    return run.info.run_id


class RunLogger:
    """Metrics into one known run id. When the tracking server is unreachable, training goes on: the
    metrics are buffered (and the outage logged) and sent with the next call once it answers again."""

    def __init__(self, uri: str, run_id: str):
        # Fail fast per request and let this class do the retrying, so no training step waits on MLflow
        # (the client's default retries back off for minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = MlflowClient(uri)
        self.run_id = run_id
        self.pending: list[Metric] = []
        self.pending_tags: list[RunTag] = []
        self.outage_since: float | None = None

    def log(self, metrics: dict[str, float], step: int) -> bool:
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        return self.flush()

    def set_tags(self, tags: dict[str, str]) -> bool:
        self.pending_tags += [RunTag(k, v) for k, v in tags.items()]
        return self.flush()

    def flush(self, wait_s: float = 0.0, backoff_s: float = 2.0) -> bool:
        """Send what is buffered; retry for up to ``wait_s`` seconds. True when nothing is left."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                while self.pending_tags:
                    self.client.log_batch(self.run_id, tags=self.pending_tags[:100])
                    self.pending_tags = self.pending_tags[100:]
                while self.pending:
                    self.client.log_batch(self.run_id, metrics=self.pending[:500])
                    self.pending = self.pending[500:]
                if self.outage_since is not None:
                    log.warning("MLflow reachable again after %.0f s; buffered metrics sent",
                                time.monotonic() - self.outage_since)
                    self.outage_since = None
                return True
            except Exception as e:  # noqa: BLE001 - any transport error: keep training, send later
                if self.outage_since is None:
                    self.outage_since = time.monotonic()
                log.warning("MLflow unreachable (%s); %d metrics buffered, training continues",
                            type(e).__name__, len(self.pending))
                if time.monotonic() + backoff_s > deadline:
                    return False
                time.sleep(backoff_s)
