"""MLflow bookkeeping, and every MLflow query of the project: one parent run per sweep, one child run
per trial, found again on resume.

Runs are created and finished by the driver side (the sweep and each trial's Tune function); the
rank-0 training worker only logs metrics into the known run id (``unmix_ray.train.logger``), so a
restarted worker keeps writing into the same run. Tags (``unmix.*``) make runs findable; run names
make them readable in the UI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag, Param, Run
from mlflow.tracking import MlflowClient

from unmix_ray.config import TrialConfig
from unmix_ray.redact import redact, safe_params

log = logging.getLogger(__name__)

TAG_ROLE, TAG_SWEEP, TAG_SWEEP_ID, TAG_TRIAL = "unmix.role", "unmix.sweep", "unmix.sweep_id", "unmix.trial"
TAG_CHECKPOINT = "unmix.checkpoint"  # the final Ray Train checkpoint (path or s3:// URI)
SWEEP_CONFIG = "sweep/config.yaml"  # the sweep's composed YAML, on its run
TAG_MODEL = "unmix.model"  # the model URI of the trial's pretrained encoder
PARENT = "mlflow.parentRunId"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite store in the working directory (absolute, since
    Ray Tune runs trials in other directories)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def store_exists(uri: str) -> bool:
    """False for a local SQLite store that does not exist yet, which a reading command must not create
    just to find it empty; any other store is taken to exist (a server answers for itself)."""
    return not (uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists())


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


def search_all(client: MlflowClient, exp_id: str, query: str) -> list[Run]:
    """Every run matching ``query``, newest first, over all result pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([exp_id], filter_string=query, order_by=["attributes.start_time DESC"],
                                  max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def find_runs(client: MlflowClient, exp_id: str, **tags: str) -> list[Run]:
    """Runs whose tags have these values, newest first."""
    return search_all(client, exp_id, " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()))


def trial_runs(uri: str, experiment: str, sweep_id: str | None) -> list[Run]:
    """The trial runs of one sweep (or, with ``sweep_id`` None, of the whole experiment), newest first."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    query = f"tags.`{TAG_ROLE}` = 'trial'" + (f" and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'" if sweep_id else "")
    return search_all(client, exp.experiment_id, query)


def latest_sweep_id(uri: str, experiment: str, name: str | None = None) -> str | None:
    """The newest sweep id in ``experiment``; ``name`` may be a sweep name or a sweep id. (MLflow's
    search has no ``or``: the two are searched one after the other.)"""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{TAG_ROLE}` = 'sweep'"
    for extra in ([f" and tags.`{TAG_SWEEP_ID}` = '{name}'", f" and tags.`{TAG_SWEEP}` = '{name}'"] if name else [""]):
        runs = client.search_runs([exp.experiment_id], query + extra, order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if runs:
            return runs[0].data.tags[TAG_SWEEP_ID]
    return None


def start_sweep_run(client: MlflowClient, exp_id: str, sweep_name: str, sweep_id: str, n_trials: int,
                    config_data: dict[str, Any] | None = None) -> str:
    """The sweep's parent run: found by its sweep id on resume (and RUNNING again), created otherwise,
    with the sweep's composed YAML as the artifact ``sweep/config.yaml`` (what ``--resume`` reads)."""
    found = find_runs(client, exp_id, **{TAG_ROLE: "sweep", TAG_SWEEP_ID: sweep_id})
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=sweep_id, tags={
        TAG_ROLE: "sweep", TAG_SWEEP: sweep_name, TAG_SWEEP_ID: sweep_id} | source_tags())
    client.log_param(run.info.run_id, "n_trials", n_trials)
    if config_data is not None:
        client.log_text(run.info.run_id, yaml.safe_dump(config_data, sort_keys=False), SWEEP_CONFIG)
    return run.info.run_id


def end_unfinished(client: MlflowClient, exp_id: str, sweep_id: str, status: str) -> None:
    """Every run of the sweep still RUNNING (its trials', then its own) ends with ``status``."""
    runs = search_all(client, exp_id, f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}' and attributes.status = 'RUNNING'")
    for run in sorted(runs, key=lambda r: r.data.tags.get(TAG_ROLE) == "sweep"):
        client.set_terminated(run.info.run_id, status=status)


def find_sweep(uri: str, name_or_id: str) -> tuple[Run, dict[str, Any]] | None:
    """The sweep run with that id, else the newest one with that name, in any experiment, and its
    composed YAML; None if there is none (or it has no config to resume from)."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    for tag in (TAG_SWEEP_ID, TAG_SWEEP):
        runs = client.search_runs(experiments, f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{tag}` = '{name_or_id}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            try:
                text = Path(client.download_artifacts(runs[0].info.run_id, SWEEP_CONFIG)).read_text()
            except Exception:  # noqa: BLE001 - an older sweep without its config, or an unreachable store
                return None
            return runs[0], yaml.safe_load(text)
    return None


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags for runs created through the client (which skips them): the git
    commit of the checkout the sweep runs from, where there is one, and the entry point."""
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": "jobs/sweep.py"}
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    commit = commit or os.environ.get("UNMIX_GIT_COMMIT", "")
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


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
    source = {k: v for k, v in client.get_run(parent_run_id).data.tags.items() if k.startswith("mlflow.source.")}
    run = client.create_run(exp_id, run_name=trial.run_name,
                            tags=trial_tags(trial, sweep_id) | source | {PARENT: parent_run_id})
    params = [Param(k, str(v)[:6000]) for k, v in safe_params(flatten(trial.to_dict())).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i:i + 100])
    client.log_inputs(run.info.run_id, datasets=[dataset_input(trial)])
    return run.info.run_id


def dataset_input(trial: TrialConfig) -> DatasetInput:
    """The trial's pretraining data as an MLflow dataset input (the UI's Dataset column): its name,
    where it comes from, the splits and subset read, and a digest of all of that."""
    ds = trial.dataset
    source = redact(ds.source or ds.root)
    read = {"splits": list(ds.pretrain_splits), "train_subset": ds.train_subset, "loader": ds.loader_module,
            "image_size": ds.image_size, "channels": ds.channels, "num_classes": ds.num_classes}
    digest = hashlib.sha256(json.dumps([source, read], sort_keys=True).encode()).hexdigest()[:8]
    dataset = Dataset(name=ds.name, digest=digest, source_type="s3" if source.startswith("s3://") else "local",
                      source=json.dumps({"uri": source}), profile=json.dumps(read))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "pretraining")])


def log_encoder(uri: str, run_id: str, checkpoint_location: str, endpoint_url: str | None = None) -> str:
    """The trial's pretrained encoder (the backbone of its final checkpoint) as the MLflow model
    ``encoder`` of its run, loadable with ``mlflow.pytorch.load_model`` and registrable from the UI;
    the project's code travels with it. Returns the model URI."""
    import mlflow.pytorch
    import torch

    import unmix_ray
    from unmix_ray import checkpoint
    from unmix_ray.evaluation import method_from_checkpoint

    state = checkpoint.read(checkpoint_location, endpoint_url)
    trial = TrialConfig.from_dict(state["trial"])
    encoder = method_from_checkpoint(state, trial, torch.device("cpu")).backbone.eval()
    mlflow.set_tracking_uri(uri)
    info = mlflow.pytorch.log_model(
        # Pickled with the project's code beside it: a traced graph would fix the batch size it was traced at.
        encoder, name="encoder", run_id=run_id, serialization_format="pickle",
        code_paths=[str(Path(unmix_ray.__file__).parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        metadata={"epoch": int(state["epoch"]), "dataset": trial.dataset.name, "backbone": trial.train.backbone,
                  "input": f"normalised float [N, {trial.dataset.channels}, {trial.dataset.crop_size}, "
                           f"{trial.dataset.crop_size}] (dataset mean/std); output: features [N, D]"})
    return info.model_uri


def results_run(client: MlflowClient, experiment_id: str, experiment: str) -> str:
    """The run that holds the table of a whole experiment (tag ``unmix.role=results``): found again,
    or created, so that re-running the report updates one place."""
    found = client.search_runs([experiment_id], f"tags.`{TAG_ROLE}` = 'results'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"results-{experiment}", tags={TAG_ROLE: "results"})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
