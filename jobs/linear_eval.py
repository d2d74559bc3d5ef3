"""Evaluate a finished run again from its checkpoint, under a chosen linear protocol (and kNN).

    python jobs/linear_eval.py --run-id RUN_ID                      # fast protocol, logged on the run
    python jobs/linear_eval.py --run-id RUN_ID --protocol paper     # the paper's augmented protocol
    python jobs/linear_eval.py --run-id RUN_ID --protocol paper --set eval.paper_epochs=30 --knn
    python jobs/linear_eval.py --checkpoint PATH_OR_S3_URI --no-log # any checkpoint, printed only
    python jobs/linear_eval.py --run-id RUN_ID --protocol paper --workers 8 --use-gpu  # ImageNet: distributed

The checkpoint is the run's ``unmix.checkpoint`` tag (set by the sweep when a trial finishes), or
--checkpoint. Its ``state.pt`` holds the trial's config; --set changes it (``eval.*`` for the protocol,
``dataset.root`` where the data lives on the machines that read it). Metrics and their ``unmix.protocol.*``
tags go to the run (--run-id, else the run id stored in the checkpoint) at step = the checkpoint's epoch.

Without --workers the evaluation runs in this process (in-memory datasets). With --workers N it is a
Ray Train job of N workers on the cluster RAY_ADDRESS names, else on an embedded local Ray: the paper
protocol then streams the data (ImageNet) through the frozen encoder on every worker and trains the
classifier data-parallel over the recipe's global batch, split evenly over the workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import _path  # noqa: F401
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from unmix_ray import checkpoint
from unmix_ray.config import ConfigError, TrialConfig, apply_overrides
from unmix_ray.data import DatasetError, is_streamed
from unmix_ray.evaluation import (
    Evaluation,
    checkpoint_epoch_text,
    evaluate,
    method_from_checkpoint,
    paper_recipe,
    per_worker_batch,
)
from unmix_ray.evaluation.linear_distributed import check_streamed_views
from unmix_ray.orchestration import tracking
from unmix_ray.redact import redact
from unmix_ray.train.logger import RunLogger


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", help="the trial's MLflow run (its checkpoint tag is read, results logged there)")
    parser.add_argument("--checkpoint", help="checkpoint folder or state.pt, local or s3://... (default: the tag)")
    parser.add_argument("--protocol", choices=["fast", "paper"], default="fast", help="linear protocol (default fast)")
    parser.add_argument("--knn", action="store_true", help="also the weighted kNN (eval.knn_k, eval.knn_t)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the trial's config (dotted path, YAML value), e.g. eval.paper_epochs=30")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--storage-endpoint-url", help="S3-compatible endpoint for s3:// checkpoints")
    parser.add_argument("--no-log", action="store_true", help="print only")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="run as a Ray Train job on N workers (RAY_ADDRESS's cluster, else a local Ray); "
                             "the paper protocol on a streamed dataset (ImageNet) needs it")
    parser.add_argument("--use-gpu", action="store_true", help="with --workers: one GPU per worker")
    parser.add_argument("--cpus-per-worker", type=float, metavar="C", help="with --workers: CPUs per worker (1)")
    parser.add_argument("--storage-path", help="with --workers: Ray Train's storage (default ~/ray_results/unmix)")
    args = parser.parse_args(argv)
    if not args.run_id and not args.checkpoint:
        parser.error("give --run-id (a run tagged unmix.checkpoint) or --checkpoint")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.workers is None and (args.use_gpu or args.cpus_per_worker is not None or args.storage_path):
        parser.error("--use-gpu, --cpus-per-worker and --storage-path go with --workers N")
    if args.cpus_per_worker is not None and args.cpus_per_worker < 0:
        parser.error("--cpus-per-worker must be >= 0")

    uri = tracking.tracking_uri()
    if args.run_id and not tracking.store_exists(uri):
        print(f"error: no run {args.run_id!r}: no MLflow store at {redact(uri)} (set MLFLOW_TRACKING_URI)",
              file=sys.stderr)
        return 2
    location = args.checkpoint
    if location is None:
        try:
            run = MlflowClient(uri).get_run(args.run_id)
        except MlflowException as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: no run {args.run_id!r} at {redact(uri)} ({redact(reason)})", file=sys.stderr)
            return 2
        location = run.data.tags.get(tracking.TAG_CHECKPOINT)
        if not location:
            print(f"error: run {args.run_id} has no {tracking.TAG_CHECKPOINT} tag (it did not finish, or predates "
                  "the tag); pass --checkpoint <Ray checkpoint folder or state.pt>", file=sys.stderr)
            return 2
    try:
        state = checkpoint.read(location, args.storage_endpoint_url)
    except checkpoint.CheckpointError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2
    try:
        trial = TrialConfig.from_dict(apply_overrides(state["trial"], args.set))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    problem = unrunnable(trial, args.protocol, args.workers)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    protocols = (("knn",) if args.knn else ()) + (args.protocol,)
    encoder_at = checkpoint_epoch_text(state, trial)
    if args.workers:
        try:
            result = evaluate_distributed(args, state, trial, protocols, encoder_at)
        except Exception as e:  # noqa: BLE001 - a failed worker or Ray itself: say so, exit non-zero
            print(f"error: the distributed evaluation failed: {redact(str(e))}", file=sys.stderr)
            return 1
    else:
        device = torch.device(args.device)
        torch.manual_seed(trial.seed)
        method = method_from_checkpoint(state, trial, device)
        result = evaluate(method, trial, device, protocols, encoder_at=encoder_at)

    print(f"{trial.run_name}, checkpoint {redact(location)} (epoch {state.get('epoch')}):")
    for tag, text in result.tags.items():
        print(f"  {tag}: {text}")
    print(json.dumps({k: round(v, 4) for k, v in result.metrics.items()}))
    if args.no_log:
        return 0
    run_id = args.run_id or state.get("run_id")
    if not run_id:
        print("error: no run to log to (the checkpoint has no run id): pass --run-id or --no-log", file=sys.stderr)
        return 2
    if args.run_id and state.get("run_id") and state["run_id"] != args.run_id:
        print(f"warning: the checkpoint was written by run {state['run_id']}, logging to {args.run_id}",
              file=sys.stderr)
    logger = RunLogger(uri, run_id)
    logger.log(result.metrics, step=int(state.get("epoch", trial.train.epochs)))
    logger.set_tags(result.tags)
    if not logger.flush(wait_s=60):
        print(f"error: could not log to MLflow at {redact(uri)}", file=sys.stderr)
        return 1
    print(f"Logged to run {run_id} at {redact(uri)}")
    return 0


def unrunnable(trial: TrialConfig, protocol: str, workers: int | None) -> str | None:
    """Why ``protocol`` cannot run on ``trial``'s dataset as asked (checked before anything starts)."""
    if protocol != "paper":
        return None
    ds = trial.dataset
    try:
        streamed = is_streamed(ds)
    except DatasetError as e:
        return str(e)
    if workers is None:
        if streamed:
            return (f"{ds.name} is streamed, too big to hold in this process: the paper protocol runs over it as "
                    "a distributed job; pass --workers N (e.g. --workers 1, or --workers 8 --use-gpu)")
        return None
    recipe = paper_recipe(trial.eval, ds.name)
    try:
        per_worker_batch(recipe, workers)
        if streamed:
            check_streamed_views(ds, recipe)
    except ValueError as e:
        return str(e)
    return None


def evaluate_distributed(args: argparse.Namespace, state: dict, trial: TrialConfig, protocols: tuple[str, ...],
                         encoder_at: str) -> Evaluation:
    """The evaluation as a Ray Train job on ``args.workers`` workers: on the cluster RAY_ADDRESS names,
    else on an embedded local Ray started (and stopped) here."""
    import ray

    from unmix_ray.orchestration.local_ray import start_local, stop_local
    from unmix_ray.orchestration.sweep import default_storage_path
    from unmix_ray.train.linear_eval import fit_linear_eval

    cpus = 1.0 if args.cpus_per_worker is None else args.cpus_per_worker
    started = False
    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            # Logical CPUs: as many as the workers ask for, even beyond this machine's cores.
            start_local(num_cpus=max(os.cpu_count() or 1, math.ceil(args.workers * cpus)))
            started = True
    try:
        return fit_linear_eval(state, trial.to_dict(), protocols, encoder_at, args.workers, use_gpu=args.use_gpu,
                               cpus_per_worker=cpus, storage_path=args.storage_path or default_storage_path())
    finally:
        if started:
            stop_local()


if __name__ == "__main__":
    sys.exit(main())
