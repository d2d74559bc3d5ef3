"""Run a sweep: Ray Tune schedules trials; each trial runs a Ray Train pretraining and its evaluation.

Ray Tune cannot wrap a ``TorchTrainer`` directly any more, so each trial is a function trainable
that builds a ``TorchTrainer`` and calls ``fit()``; ``TuneReportCallback`` forwards rank-0 metrics to
Tune's progress table. Names are deterministic (sweep id + trial name) so a restarted trial or a
resumed sweep finds its Train run, its checkpoints and its MLflow run again.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from unmix_ray.config import Sweep, TuneSettings
from unmix_ray.orchestration import tracking
from unmix_ray.orchestration.plots import log_sweep_plots
from unmix_ray.orchestration.render import log_results
from unmix_ray.orchestration.resources import driver_resources, runtime_cluster, sweep_max_concurrent
from unmix_ray.orchestration.results import ResultsTable, build_results
from unmix_ray.orchestration.trial import MlflowTrialStatus, SweepContext, run_trial
from unmix_ray.storage import resolve_endpoint

log = logging.getLogger(__name__)

TRIAL_DRIVER = "trial_driver"  # custom resource: slots for trial drivers, on the head node


def new_sweep_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_storage_path() -> str:
    return str(Path("~/ray_results/unmix").expanduser())


def driver_slot(settings: TuneSettings) -> dict[str, float]:
    """What each trial's driver holds: as configured, else a trial_driver slot where the cluster offers
    one (our cluster YAML's head, the embedded local Ray), else a sliver of CPU."""
    wanted = {k: v for k, v in driver_resources(settings).items() if v > 0}
    if wanted:
        return wanted
    return {TRIAL_DRIVER: 1} if ray.cluster_resources().get(TRIAL_DRIVER) else {"CPU": 0.01}


def run_sweep(sweep: Sweep, tracking_uri: str | None = None, sweep_id: str | None = None) -> ResultsTable:
    """Run every trial of ``sweep`` (resuming ``sweep_id`` if given) and return the results table."""
    uri = tracking_uri or tracking.tracking_uri()
    settings = sweep.config.tune
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):  # a Ray job, or a user pointing at a cluster
            ray.init()
        else:
            # A fresh embedded local Ray (never some other cluster running on this machine); trial drivers
            # get their own slots so that they do not hold the CPUs training needs.
            ray.init(address="local", resources={TRIAL_DRIVER: 64})
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, sweep.config.experiment)
    resuming = sweep_id is not None
    sweep_id = sweep_id or new_sweep_id(sweep.name)
    parent = tracking.start_sweep_run(client, exp_id, sweep.name, sweep_id, len(sweep.trials))
    endpoint = resolve_endpoint(settings.storage_endpoint_url)  # once here: the driver and every trial agree
    ctx = SweepContext(sweep_id, exp_id, parent, uri, settings.storage_path or default_storage_path(), endpoint)
    storage_path, storage_fs = ctx.storage()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trials={t.run_name: t.to_dict() for t in sweep.trials}),
        driver_slot(settings))
    if settings.asha is not None:
        # Untrained references and epochs between kNN monitors report no monitor metric: let those
        # results through (set before a fresh start and before a restore, which brings ASHA back).
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's grid and progress table show only the trial's name; its full config is looked up by it.
    param_space = {"run": tune.grid_search([t.run_name for t in sweep.trials]), "context": ctx.__dict__}
    max_concurrent = settings.max_concurrent_trials or sweep_max_concurrent(
        runtime_cluster(ray.cluster_resources()).nodes, sweep)
    experiment_path = f"{storage_path.rstrip('/')}/{sweep_id}"
    callbacks = [MlflowTrialStatus(uri, exp_id, sweep_id)]
    if resuming:
        if not tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs):
            raise FileNotFoundError(f"no sweep state to resume at {experiment_path}")
        # Finished trials stay finished; unfinished ones start again and their Train runs resume from
        # their last checkpoints (same names, same storage); their MLflow runs are found by tag.
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=storage_fs,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler(settings),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=sweep_id, storage_path=storage_path, storage_filesystem=storage_fs,
                                      callbacks=callbacks),
        )
    print(f"Sweep {sweep_id}: {len(sweep.trials)} trials, at most {max_concurrent} at once "
          f"(resume with: python jobs/sweep.py --config ... --resume {sweep_id})", flush=True)
    tuner.fit()
    table = build_results(uri, sweep.config.experiment, sweep_id)
    log_results(client, parent, table)
    log_sweep_plots(client, parent, uri, sweep.config.experiment, sweep_id, table)
    # Trials a scheduler stopped early (KILLED) are an expected outcome; a FAILED one fails the sweep.
    client.set_terminated(parent, status="FAILED" if table.failed else "FINISHED")
    return table


def scheduler(settings: TuneSettings) -> ASHAScheduler | None:
    if settings.asha is None:
        return None
    a = settings.asha
    max_t = 10**6  # the epochs each trial runs come from its own config; ASHA only cuts
    return ASHAScheduler(time_attr="epoch", metric=a.metric, mode=a.mode, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor, max_t=max_t)


def _trial_name(trial: Any) -> str:
    return trial.config["run"]
