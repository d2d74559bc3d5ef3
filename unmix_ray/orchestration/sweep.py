"""Run a sweep: Ray Tune schedules trials; each trial runs a Ray Train pretraining and its evaluation.

Everything that can be checked is checked before the cluster does any work or MLflow is written:
the Tune state of a resumed sweep, that every trial can fit on the cluster (at full scale, where it
autoscales), and the data of datasets that live only on the cluster's nodes (on one node, once).
While it runs, MLflow tells the truth: a sweep stopped by Ctrl-C or SIGTERM marks its unfinished runs
KILLED and raises ``SweepInterrupted``; any other way out marks them FAILED.

Ray Tune cannot wrap a ``TorchTrainer`` directly any more, so each trial is a function trainable
(``trial.run_trial``). Names are deterministic (sweep id + trial name) so a restarted trial or a
resumed sweep finds its Train run, its checkpoints and its MLflow run again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune

from unmix_ray.config import Sweep, TuneSettings
from unmix_ray.orchestration import tracking
from unmix_ray.orchestration.console import ConsoleReporter
from unmix_ray.orchestration.local_ray import TRIAL_DRIVER, start_local
from unmix_ray.orchestration.plots import log_sweep_plots
from unmix_ray.orchestration.preflight import check_remote_data
from unmix_ray.orchestration.render import log_results
from unmix_ray.orchestration.resources import (
    driver_resources,
    head_limited,
    runtime_cluster,
    sweep_max_concurrent,
    sweep_placements,
)
from unmix_ray.orchestration.results import ResultsTable, build_results
from unmix_ray.orchestration.schedulers import scheduler
from unmix_ray.orchestration.trial import MlflowTrialStatus, SweepContext, run_trial
from unmix_ray.storage import resolve_endpoint

log = logging.getLogger(__name__)


class SweepError(RuntimeError):
    """A problem found before any cluster work or MLflow write: the sweep cannot run as asked."""


class SweepInterrupted(RuntimeError):
    """The sweep was stopped by a signal; its unfinished runs are KILLED and it can be resumed."""

    def __init__(self, signum: int, sweep_id: str):
        self.signum, self.sweep_id = signum, sweep_id
        super().__init__(f"sweep {sweep_id} stopped by {signal.Signals(signum).name}; resume it with: "
                         f"python jobs/sweep.py --resume {sweep_id}")


def new_sweep_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_storage_path() -> str:
    return str(Path("~/ray_results/unmix").expanduser())


def connect(verbose: bool = False, runtime_env: dict[str, Any] | None = None) -> bool:
    """Ray for the sweep: the cluster ``RAY_ADDRESS`` names (a Ray job, or a user pointing at one), else
    a fresh embedded local Ray of this machine. Returns whether the embedded one was started."""
    if ray.is_initialized():
        return False
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, **quiet)
        return False
    # Trial drivers only wait on Train: they get slots of their own instead of the CPUs training needs.
    start_local(resources={TRIAL_DRIVER: 64}, runtime_env=runtime_env, **quiet)
    return True


def driver_slot(settings: TuneSettings) -> dict[str, float]:
    """What each trial's driver holds: as configured, else a trial_driver slot where the cluster offers
    one (our cluster files' head, the embedded local Ray), else a sliver of CPU."""
    wanted = {k: v for k, v in driver_resources(settings).items() if v > 0}
    if wanted:
        return wanted
    return {TRIAL_DRIVER: 1} if ray.cluster_resources().get(TRIAL_DRIVER) else {"CPU": 0.01}


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Ctrl-C and SIGTERM end Tune's loop the way Tune ends it itself (it saves the experiment state,
    so the sweep can be resumed); the signal is recorded so the caller can mark its runs KILLED. A
    second signal stops at once."""
    caught: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping the sweep (again to stop at once)", flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)  # Tune's own graceful stop

    if threading.current_thread() is not threading.main_thread():
        yield caught  # signals reach the main thread only; whoever runs this thread handles them
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    for s in previous:
        signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def run_sweep(sweep: Sweep, tracking_uri: str | None = None, sweep_id: str | None = None,
              cluster: str | Path | None = None, verbose: bool = False,
              config_data: dict[str, Any] | None = None) -> ResultsTable:
    """Run every trial of ``sweep`` (resuming ``sweep_id`` if given) and return the results table.

    ``cluster``: a launcher YAML or KubeRay manifest describing the cluster at full scale (see
    ``resources.runtime_cluster``). ``config_data``: the sweep's YAML as composed (logged on the sweep's
    MLflow run, so ``--resume NAME`` needs no ``--config``)."""
    uri = tracking_uri or tracking.tracking_uri()
    settings = sweep.config.tune
    connect(verbose)
    resuming = sweep_id is not None
    sweep_id = sweep_id or new_sweep_id(sweep.name)
    endpoint = resolve_endpoint(settings.storage_endpoint_url)  # once here: the driver and every trial agree
    storage = settings.storage_path or default_storage_path()
    storage_path, storage_fs = SweepContext("", "", "", uri, storage, endpoint).storage()
    experiment_path = f"{storage_path.rstrip('/')}/{sweep_id}"
    if resuming and not tune.Tuner.can_restore(experiment_path, storage_filesystem=storage_fs):
        raise SweepError(f"no sweep state to resume at {experiment_path} (sweep {sweep_id}); nothing was written")
    spec = runtime_cluster(ray.cluster_resources(), cluster)
    placements = sweep_placements(spec.nodes, sweep)
    try:
        feasible = head_limited(sweep_max_concurrent(spec.nodes, sweep, placements), spec)
    except ValueError as e:
        raise SweepError(f"{e} ({spec.name}); nothing was started") from None
    max_concurrent = min(settings.max_concurrent_trials or feasible, feasible)
    problems = check_remote_data(sweep, placements, settings.placement_timeout_s)
    if problems:
        raise SweepError("the data the trials would read is missing or broken on the cluster:\n"
                         + "\n".join(problems))

    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, sweep.config.experiment)
    parent = tracking.start_sweep_run(client, exp_id, sweep.name, sweep_id, len(sweep.trials), config_data)
    ctx = SweepContext(sweep_id, exp_id, parent, uri, storage, endpoint)
    try:
        with stop_signals() as caught:
            _fit(sweep, ctx, placements, max_concurrent, resuming, verbose, experiment_path, storage_fs)
        if caught:
            tracking.end_unfinished(client, exp_id, sweep_id, "KILLED")
            raise SweepInterrupted(caught[0], sweep_id)
        table = build_results(uri, sweep.config.experiment, sweep_id)
        log_results(client, parent, table)
        log_sweep_plots(client, parent, uri, sweep.config.experiment, sweep_id, table)
    except SweepInterrupted:
        raise
    except BaseException as e:
        tracking.end_unfinished(client, exp_id, sweep_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    # Trials a scheduler stopped early (KILLED) are an expected outcome; a FAILED one fails the sweep.
    client.set_terminated(parent, status="FAILED" if table.failed else "FINISHED")
    return table


def _fit(sweep: Sweep, ctx: SweepContext, placements: dict, max_concurrent: int, resuming: bool, verbose: bool,
         experiment_path: str, storage_fs: Any) -> None:
    settings = sweep.config.tune
    storage_path, _ = ctx.storage()
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trials={t.run_name: t.to_dict() for t in sweep.trials},
                             placements={name: p.__dict__ for name, p in placements.items()},
                             context=ctx.__dict__, placement_timeout_s=settings.placement_timeout_s,
                             log_encoder=settings.log_encoder, system_metrics_s=settings.system_metrics_s),
        driver_slot(settings))
    if settings.asha is not None:
        # Untrained references and epochs between kNN monitors report no monitor metric: let those
        # results through (set before a fresh start and before a restore, which brings ASHA back).
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's grid shows only the trial's name; its full config is looked up by it.
    param_space = {"run": tune.grid_search([t.run_name for t in sweep.trials])}
    callbacks = [MlflowTrialStatus(ctx.tracking_uri, ctx.experiment_id, ctx.sweep_id),
                 ConsoleReporter(len(sweep.trials))]
    if resuming:
        # Finished trials stay finished; unfinished ones start again and their Train runs resume from
        # their last checkpoints (same names, same storage); their MLflow runs are found by tag.
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=storage_fs,
                                   param_space=param_space)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, scheduler=scheduler(sweep),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=ctx.sweep_id, storage_path=storage_path, storage_filesystem=storage_fs,
                                      callbacks=callbacks, verbose=2 if verbose else 0),
        )
    print(f"Sweep {ctx.sweep_id}: {len(sweep.trials)} trials, at most {max_concurrent} at once "
          f"(resume with: python jobs/sweep.py --resume {ctx.sweep_id})", flush=True)
    tuner.fit()


def _trial_name(trial: Any) -> str:
    return trial.config["run"]
