"""The Ray Train loop run by every worker: pretrain one method with (or without) Un-Mix, then evaluate.

The step itself is ``unmix_ray.step.Pretrainer``; this loop adds what needs Ray and MLflow: the
worker's rank and device, global BatchNorm (``train.sync_bn``), DDP, checkpoints through Ray Train
(``unmix_ray.checkpoint`` writes and reads them), per-epoch reports (Tune schedulers decide on them)
and rank 0's MLflow logging. Random
streams (augmentation, mixture, batch order) are re-seeded from (seed, rank, epoch) at every epoch
start, so a run resumed from an epoch checkpoint continues exactly as it would have.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray.train
import ray.train.torch
import torch

from unmix_ray import checkpoint
from unmix_ray.collectives import mean_over_ranks
from unmix_ray.config import TrialConfig
from unmix_ray.data import image_loader
from unmix_ray.evaluation import PROTOCOL_TAG, evaluate, knn_protocol, monitor_knn
from unmix_ray.optim import scaled_lr
from unmix_ray.step import NonFiniteLossError, Pretrainer, build_training
from unmix_ray.train.logger import RunLogger, SystemMetrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    trial = TrialConfig.from_dict(config["trial"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if trial.train.torch_threads:
        torch.set_num_threads(trial.train.torch_threads)
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None
    system = (SystemMetrics(config["tracking_uri"], config["run_id"], config["system_metrics_s"])
              if logger and config.get("system_metrics_s") else None)
    try:
        _train(trial, config, rank, world, logger)
    finally:
        if system:
            system.stop()


def _train(trial: TrialConfig, config: dict[str, Any], rank: int, world: int, logger: RunLogger | None) -> None:
    tc = trial.train
    device = ray.train.torch.get_device()

    batches = image_loader(trial.dataset, trial.dataset.pretrain_splits, tc.batch_per_worker, mode="pretrain",
                           seed=trial.seed, rank=rank, world_size=world)
    method, optimizer, scheduler = build_training(trial, len(batches), device, world)
    start_epoch = restore(method, optimizer, scheduler, device)
    # Buffers are not re-broadcast each step: method state such as the MoCo queue is kept identical by
    # construction, and BN running statistics (per rank without global BN) are averaged over the ranks
    # at the end of every epoch (Pretrainer.train_epoch), before its evaluations and checkpoint, so every
    # rank's evaluation shard is encoded by one network.
    model = (ray.train.torch.prepare_model(method, parallel_strategy_kwargs={"broadcast_buffers": False})
             if world > 1 else method)
    if tc.compile:
        model = torch.compile(model)
    trainer = Pretrainer.for_trial(trial, model, method, optimizer, scheduler, device)

    total_steps = max(1, len(batches) * tc.epochs)
    for epoch in range(start_epoch, tc.epochs):
        start = time.perf_counter()
        try:
            mean_loss = trainer.train_epoch(batches, trial.mixture, trial.seed, rank, epoch, device, total_steps,
                                            where=f"epoch {epoch + 1}, ")
        except NonFiniteLossError as e:
            message = f"{e} of {trial.run_name}"
            if logger:
                logger.set_tags({"unmix.error": message})
            raise NonFiniteLossError(message) from None
        elapsed = time.perf_counter() - start
        loss = mean_over_ranks(mean_loss).tolist()
        metrics = {
            "loss": loss[0], "loss_clean": loss[1], "loss_mixed": loss[2],
            "lr": scheduler.get_last_lr()[0], "lr_scaled": scaled_lr(trial.method.optim, tc.batch_size),
            "images_per_s": len(batches) * tc.batch_size / elapsed, "epoch": epoch + 1,
        }
        last = epoch + 1 == tc.epochs
        if trial.eval.knn_every and (epoch + 1) % trial.eval.knn_every == 0:
            knn = monitor_knn(method, trial, device)  # every rank extracts a shard; rank 0 scores
            if knn is not None:
                metrics["monitor_knn_top1"] = knn
        if last:
            # The final evaluation rides on the last epoch's report, so a scheduler deciding on that
            # report (ASHA at a rung) never cuts a finished training off before its numbers exist.
            metrics |= final_evaluation(method, trial, device, logger)
        ckpt = None
        if rank == 0 and ((epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == tc.epochs):
            ckpt = save(method, optimizer, scheduler, epoch + 1, config)
        if logger:
            logger.log(metrics, step=epoch + 1)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch={epoch + 1:04d}" if ckpt else None,
                         delete_local_checkpoint_after_upload=True)

    if start_epoch >= tc.epochs:  # nothing to train: the untrained reference, or restored after the end
        final: dict[str, Any] = {"epoch": tc.epochs} | final_evaluation(method, trial, device, logger)
        ckpt = None
        if rank == 0:
            if tc.epochs == 0:  # keep the initial weights, for re-evaluation
                ckpt = save(method, optimizer, scheduler, 0, config)
        ray.train.report(final, checkpoint=ckpt, checkpoint_dir_name="epoch=0000" if ckpt else None,
                         delete_local_checkpoint_after_upload=True)
    if logger and not logger.flush(wait_s=600):
        raise RuntimeError(f"MLflow unreachable for 10 minutes; {len(logger.pending)} metrics not logged")


def final_evaluation(method: torch.nn.Module, trial: TrialConfig, device: torch.device,
                     logger: RunLogger | None) -> dict[str, float]:
    """kNN and the configured linear protocols (``eval.linear_protocols``) on the full train split,
    logged with the tags that name their protocols."""
    ev, ds = trial.eval, trial.dataset
    result = evaluate(method, trial, device, ("knn",) + tuple(ev.linear_protocols))
    if logger:
        logger.log(result.metrics, step=trial.train.epochs)
        bank = f"{ds.train_split} split" + (f" (seeded subset of {ds.train_subset})" if ds.train_subset else "")
        logger.set_tags(result.tags | {
            PROTOCOL_TAG + "monitor_knn": knn_protocol(ev, bank=bank, encoder_at="each epoch",
                                                       representation=method.knn_representation),
        })
    return result.metrics


def save(method: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
         config: dict[str, Any]) -> ray.train.Checkpoint:
    """A Ray Train checkpoint of everything needed to continue (see ``unmix_ray.checkpoint``)."""
    folder = checkpoint.write(method, optimizer, scheduler, epoch, config.get("run_id"), config["trial"])
    return ray.train.Checkpoint.from_directory(str(folder))


def restore(method: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
            device: torch.device) -> int:
    """Load Ray Train's latest checkpoint (after a worker/node failure or a resumed run); the epoch to
    start from."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        state = checkpoint.read(os.path.join(d, checkpoint.CHECKPOINT_FILE), map_location=device)
    return checkpoint.load_into(state, method, optimizer, scheduler)
