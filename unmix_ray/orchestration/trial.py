"""One trial of a sweep, as Ray Tune runs it: a function trainable that builds a ``TorchTrainer`` for
the trial's pretraining and evaluation and tracks it in one MLflow run, and the Tune callback that
ends a trial's run from the driver side when the trial itself could not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import placement_group, remove_placement_group

from unmix_ray.config import TrialConfig
from unmix_ray.orchestration import tracking
from unmix_ray.orchestration.resources import Placement
from unmix_ray.orchestration.results import TABLE_METRICS
from unmix_ray.redact import redact
from unmix_ray.storage import arrow_filesystem
from unmix_ray.train.loop import train_loop_per_worker


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep instance shares."""

    sweep_id: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    storage_path: str
    storage_endpoint_url: str | None = None

    def storage(self) -> tuple[str, Any]:
        """Ray's (storage_path, storage_filesystem): S3 paths on an S3-compatible endpoint get an explicit
        filesystem; credentials come from the environment or instance role."""
        if not (self.storage_path.startswith("s3://") and self.storage_endpoint_url):
            return self.storage_path, None
        fs, path = arrow_filesystem(self.storage_path, self.storage_endpoint_url)
        return path, fs


class TrialUnplaceable(RuntimeError):
    """A trial's workers found no room on the cluster within the placement timeout."""


def wait_for_room(placement: Placement, num_workers: int, timeout_s: float, run_name: str) -> None:
    """Reserve the trial's workers as one placement group and give it back: an autoscaler sees the
    demand and brings nodes up; a trial that still finds no room after ``timeout_s`` fails, naming
    what it waited for, instead of waiting inside Ray Train forever."""
    pg = placement_group([placement.resources_per_worker] * num_workers, strategy=placement.strategy)
    try:
        if not pg.wait(timeout_seconds=timeout_s):
            wanted = ", ".join(f"{k} {v:g}" for k, v in sorted(placement.resources_per_worker.items()))
            raise TrialUnplaceable(f"{run_name}: no room for {num_workers} worker(s) of {{{wanted}}} "
                                   f"({placement.strategy}) after {timeout_s:.0f} s (tune.placement_timeout_s); "
                                   f"the cluster has {ray.cluster_resources()}")
    finally:
        remove_placement_group(pg)


def scaling_config(trial: TrialConfig, placement: Placement) -> ScalingConfig:
    """Where and how many Ray Train workers the trial gets: its planned placement."""
    return ScalingConfig(num_workers=trial.train.num_workers, use_gpu=trial.train.use_gpu,
                         resources_per_worker=placement.resources_per_worker,
                         accelerator_type=placement.accelerator_type, placement_strategy=placement.strategy)


def run_trial(config: dict[str, Any], trials: dict[str, dict[str, Any]], placements: dict[str, dict[str, Any]],
              context: dict[str, Any], placement_timeout_s: float, log_encoder: bool = True,
              system_metrics_s: float = 0.0) -> None:
    """Tune function trainable: one Ray Train pretraining + evaluation, tracked in one MLflow run.
    ``trials`` (every trial's config, by name) and ``placements`` (where its workers go) are put in
    Ray's object store once, not in each config. ``context`` (the sweep's ids, MLflow and storage
    addresses) is the running driver's, never the trial config's: Tune restores a trial's config as it
    was saved, and after a new head the MLflow server has a new address. A finished pretraining's
    encoder is logged as the run's MLflow model (``log_encoder``)."""
    trial_dict = trials[config["run"]]
    trial = TrialConfig.from_dict(trial_dict)
    ctx = SweepContext(**context)
    client = MlflowClient(ctx.tracking_uri)
    run_id = tracking.start_trial_run(client, ctx.experiment_id, ctx.parent_run_id, ctx.sweep_id, trial)
    tc = trial.train
    placement = Placement(**placements[trial.run_name])
    try:
        wait_for_room(placement, tc.num_workers, placement_timeout_s, trial.run_name)
    except TrialUnplaceable as e:
        client.set_tag(run_id, "unmix.error", str(e))
        raise
    storage_path, storage_fs = ctx.storage()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": trial_dict, "run_id": run_id, "tracking_uri": ctx.tracking_uri,
                           "system_metrics_s": system_metrics_s},
        scaling_config=scaling_config(trial, placement),
        run_config=RunConfig(
            name=f"{ctx.sweep_id}--{trial.run_name}",
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
            callbacks=[TuneReportCallback()],
        ),
    )
    # A failure (or Tune's stop) ends the run from the driver side, in MlflowTrialStatus: an exception
    # here can also be the stop itself arriving, which must not be recorded as a failure.
    result = trainer.fit()
    if result.checkpoint is not None:
        scheme = "s3://" if ctx.storage_path.startswith("s3://") else ""
        location = scheme + result.checkpoint.path
        client.set_tag(run_id, tracking.TAG_CHECKPOINT, location)
        if log_encoder and tc.epochs:
            client.set_tag(run_id, tracking.TAG_MODEL, tracking.log_encoder(
                ctx.tracking_uri, run_id, location, ctx.storage_endpoint_url))
    client.set_terminated(run_id, status="FINISHED")


def _error_text(trial: Any) -> str:
    """The last line of the trial's error as Tune recorded it (the exception and its message)."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()] if path else []
    except OSError:
        lines = []
    return redact(lines[-1][:2000]) if lines else "the trial failed (see its Tune log)"


# The MLflow address of each sweep this driver runs. Tune saves its callbacks with the sweep's state and
# a resumed sweep gets them back as saved, with the address of the head that started it: after a new
# head, the running driver's address is the one that answers.
_DRIVER_URIS: dict[str, str] = {}


class MlflowTrialStatus(tune.Callback):
    """Ends a trial's MLflow run from the driver side, where Tune's word is final: a trial that errored is
    FAILED (with its error as the tag ``unmix.error``); one that Tune stopped (a scheduler's early stop)
    is KILLED. A trial only ever marks its own run FINISHED."""

    def __init__(self, uri: str, experiment_id: str, sweep_id: str):
        self.uri, self.experiment_id, self.sweep_id = uri, experiment_id, sweep_id
        _DRIVER_URIS[sweep_id] = uri

    def _end(self, trial: Any, status: str) -> None:
        client = MlflowClient(_DRIVER_URIS.get(self.sweep_id, self.uri))
        runs = tracking.find_runs(client, self.experiment_id,
                                  **{tracking.TAG_SWEEP_ID: self.sweep_id, tracking.TAG_TRIAL: trial.config["run"]})
        for run in runs:
            if run.info.status != "RUNNING":
                continue
            if status == "FAILED" and "unmix.error" not in run.data.tags:
                client.set_tag(run.info.run_id, "unmix.error", _error_text(trial))
            # Stopped at its last report, after its final evaluation: it finished, nothing was cut.
            done = status == "KILLED" and any(m in run.data.metrics for m in TABLE_METRICS[1:])
            client.set_terminated(run.info.run_id, status="FINISHED" if done else status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "KILLED")


