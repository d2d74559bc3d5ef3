"""A checkpoint's evaluation as a Ray Train job: every worker builds the pretrained method from the
checkpoint's state and the workers run the protocols together. The paper's linear protocol runs
data-parallel over the workers and the (streamed) data (``evaluate_paper_sharded``); kNN and ``fast``
are sharded as a trial's final evaluation shards them (``evaluate``). Rank 0 returns the numbers and
their protocol tags; ``jobs/linear_eval.py`` logs them to the run.

The state travels once through Ray's object store, so the workers need no access to where the
checkpoint lies (a local folder of the machine that started the job, or S3 credentials).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from unmix_ray.config import TrialConfig
from unmix_ray.evaluation import Evaluation, evaluate, evaluate_paper_sharded, method_from_checkpoint, paper_recipe


def linear_eval_loop(config: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Ray Train's ``train_loop_per_worker``: evaluate the checkpoint under ``config["protocols"]``.
    Returns ``{"metrics": ..., "tags": ...}`` on rank 0 (``Result.return_value``), None elsewhere."""
    trial = TrialConfig.from_dict(config["trial"])
    rank = ray.train.get_context().get_world_rank()
    if trial.train.torch_threads:
        torch.set_num_threads(trial.train.torch_threads)
    device = ray.train.torch.get_device()
    torch.manual_seed(trial.seed)
    method = method_from_checkpoint(ray.get(config["state"]), trial, device)
    protocols = tuple(config["protocols"])
    encoder_at = config["encoder_at"]
    out = Evaluation()
    others = tuple(p for p in protocols if p != "paper")
    if others:  # every rank encodes its shard; rank 0 scores
        res = evaluate(method, trial, device, others, encoder_at=encoder_at)
        out.metrics |= res.metrics
        out.tags |= res.tags
    if "paper" in protocols:
        epochs = paper_recipe(trial.eval, trial.dataset.name).epochs

        def progress(epoch: int, top1: float, top5: float) -> None:
            if rank == 0:
                print(f"linear (paper) epoch {epoch}/{epochs}: test top-1 {top1:.2f}, top-5 {top5:.2f}", flush=True)

        res = evaluate_paper_sharded(method, trial, device, encoder_at, on_epoch=progress)
        out.metrics |= res.metrics
        out.tags |= res.tags
    return {"metrics": out.metrics, "tags": out.tags} if rank == 0 else None


def fit_linear_eval(state: dict[str, Any], trial: dict[str, Any], protocols: tuple[str, ...], encoder_at: str,
                    workers: int, use_gpu: bool = False, cpus_per_worker: float = 1.0,
                    storage_path: str | None = None) -> Evaluation:
    """Evaluate the checkpoint ``state`` (with the trial config ``trial``, overrides applied) on
    ``workers`` Ray Train workers of the connected Ray; the metrics and protocol tags of rank 0.
    Raises ``ray.train.TrainingFailedError`` when a worker fails (no retry: a rerun starts over)."""
    run_name = TrialConfig.from_dict(trial).run_name
    trainer = TorchTrainer(
        linear_eval_loop,
        train_loop_config={"trial": trial, "state": ray.put(state), "protocols": list(protocols),
                           "encoder_at": encoder_at},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        # A fresh name each time: Ray Train resumes a run whose name it finds in the storage.
        run_config=RunConfig(name=f"linear-eval--{run_name}--{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}",
                             storage_path=storage_path, failure_config=FailureConfig(max_failures=0)),
    )
    returned = trainer.fit().return_value
    if not returned:
        raise RuntimeError("the evaluation's rank 0 worker returned no result")
    return Evaluation(dict(returned["metrics"]), dict(returned["tags"]))
