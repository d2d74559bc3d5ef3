"""A small sweep's MLflow runs written by hand, with the project's own tags, params and protocol tags,
and metric values chosen so the results table has answers that can be worked out on paper.

kNN top-1 per seed (linear top-1 = kNN + 5 everywhere):

    untrained   s0 70  s1 71  s2 72
    none        s0 80  s1 82  s2 84
    mixup       s0 81  s1 84  s2 87          paired differences 1, 2, 3
    cutmix      s0 83  s1 85  s2 (KILLED, logged 99 before it was stopped)
    both@0.5    s3 85  s4 87                  no seed shared with `none`: Welch
    both@0.25   s0 (FAILED, no metrics)
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.tracking import MlflowClient

from unmix_ray.compose import load_sweep
from unmix_ray.evaluation import PROTOCOL_TAG, knn_protocol, linear_protocol
from unmix_ray.orchestration import tracking
from unmix_ray.train.logger import RunLogger

from .conftest import ROOT

KNN = {
    ("untrained", 0): 70, ("untrained", 1): 71, ("untrained", 2): 72,
    ("none", 0): 80, ("none", 1): 82, ("none", 2): 84,
    ("mixup", 0): 81, ("mixup", 1): 84, ("mixup", 2): 87,
    ("cutmix", 0): 83, ("cutmix", 1): 85, ("cutmix", 2): 99,
    ("both@0.5", 3): 85, ("both@0.5", 4): 87,
}
STATUS = {("cutmix", 2): "KILLED", ("both@0.25", 0): "FAILED"}
LINEAR_OFFSET = 5.0


@dataclass
class HandmadeSweep:
    uri: str
    experiment: str
    sweep_id: str
    parent_run_id: str
    run_ids: dict[tuple[str, int], str]


def log_handmade_sweep(uri: str, experiment: str = "unmix-ray", sweep_id: str = "handmade-20250101-000000",
                       epochs: int = 3) -> HandmadeSweep:
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        "grid.mixture=[none, mixup, cutmix, both]", "grid.seed=[0,1,2]", "grid.prob=[0.5,0.25]",
        "untrained_seeds=all", f"train.epochs={epochs}", f"experiment={experiment}", "eval.knn_k=20"])
    trials = {(t.variant, t.seed): t for t in sweep.trials}
    trials[("both@0.5", 3)] = trials[("both@0.5", 0)].model_copy(update={"seed": 3})
    trials[("both@0.5", 4)] = trials[("both@0.5", 0)].model_copy(update={"seed": 4})
    wanted = set(KNN) | set(STATUS)
    client = MlflowClient(uri)
    exp_id = tracking.experiment_id(client, experiment)
    parent = tracking.start_sweep_run(client, exp_id, sweep.name, sweep_id, len(wanted))
    run_ids = {}
    for key in sorted(wanted, key=str):
        trial = trials[key]
        run_id = tracking.start_trial_run(client, exp_id, parent, sweep_id, trial)
        run_ids[key] = run_id
        status = STATUS.get(key, "FINISHED")
        logger = RunLogger(uri, run_id)
        if trial.train.epochs:
            for epoch in range(1, epochs + 1 if status == "FINISHED" else 2):
                logger.log({"loss": 6.0 - epoch, "loss_clean": 3.0 - epoch / 2, "loss_mixed": 3.0 - epoch / 2,
                            "monitor_knn_top1": KNN.get(key, 60) - 2 * (epochs - epoch)}, step=epoch)
        if key in KNN:
            logger.log({"knn_top1": KNN[key], "knn_top5": 99.0, "linear_top1": KNN[key] + LINEAR_OFFSET,
                        "linear_top5": 99.5}, step=trial.train.epochs)
            bank = f"train split ({60000} images)"
            logger.set_tags({PROTOCOL_TAG + "knn": knn_protocol(trial.eval, bank),
                             PROTOCOL_TAG + "linear": linear_protocol(trial.eval)})
        client.set_terminated(run_id, status=status)
    return HandmadeSweep(uri, experiment, sweep_id, parent, run_ids)
