"""Rank 0's MLflow logging into a known run id, so a restarted worker keeps writing into the same run.
When the tracking server is unreachable, training goes on: metrics are buffered and sent when it answers."""

from __future__ import annotations

import logging
import os
import time

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


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


class SystemMetrics:
    """MLflow's system metrics (CPU, memory, disk, network, and GPU where present) of this worker's node,
    sampled every ``interval_s`` seconds into the run as ``system/*``: whether a trial is input-bound
    shows there. Resumes its step count when a restarted worker starts it again."""

    def __init__(self, uri: str, run_id: str, interval_s: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                            tracking_uri=uri)
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.finish()
