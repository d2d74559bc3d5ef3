"""What Ray Train costs per epoch: the same epochs in a plain PyTorch loop and through Ray Train.

Same code (``unmix_ray.step.Pretrainer``), model (narrow ResNet, SimCLR with Un-Mix ``both``),
data (a Fashion-MNIST subset) and global batch in every setting; the CPU threads in use are the same
too (plain: one process with T threads; Ray 1 worker: T threads; Ray 2 workers: T/2 threads each, each
on half of every global batch, DDP over gloo). Per-epoch times exclude the first (warm-up) epoch.
Cluster start-up (``ray.init``) and Train's set-up are reported separately.

    python bench/ray_overhead.py [--epochs 4] [--images 4096] [--batch 128] [--threads 2]

Last line: one JSON object {"ray_1_worker": {"ratio": r, ...}, "ray_2_workers": {...}, "startup_s": {...}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def build(args: dict, rank: int, world: int):
    from unmix_ray.augment import BatchAugment
    from unmix_ray.config import AugmentConfig, MethodConfig, MixtureConfig, OptimConfig
    from unmix_ray.data import fashion_mnist
    from unmix_ray.data.loader import MemoryBatches
    from unmix_ray.methods import build_method
    from unmix_ray.models import NarrowResNet
    from unmix_ray.optim import build_optimizer, build_scheduler
    from unmix_ray.step import Pretrainer
    from unmix_ray.unmix import MixtureSampler

    torch.set_num_threads(args["threads"] // world)
    data = fashion_mnist.load(args["root"], "train").subset(args["images"], 0)
    torch.manual_seed(0)
    optim = OptimConfig(name="adam", lr=3e-3, weight_decay=1e-6)
    method = build_method(MethodConfig(name="simclr", params={"proj_hidden": 256, "proj_dim": 64}, optim=optim),
                          NarrowResNet(1, 16))
    batches = MemoryBatches(data, args["batch"] // world, rank, world, seed=0, shuffle=True, drop_last=True)
    optimizer = build_optimizer(method, optim, args["batch"])
    scheduler = build_scheduler(optimizer, optim, len(batches), args["epochs"], args["batch"])
    augment = BatchAugment(AugmentConfig(jitter=(0.4, 0.4, 0.0, 0.0), gray_p=0.0), 28, (0.286,), (0.353,),
                           torch.Generator().manual_seed(rank))
    return method, Pretrainer(method, method, optimizer, scheduler, augment), batches, MixtureSampler(
        MixtureConfig(type="both"), seed=rank)


def timed_epochs(trainer, batches, mixer, epochs: int) -> list[float]:
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        batches.set_epoch(epoch)
        loss = trainer.epoch(batches, mixer, torch.device("cpu"))
        loss.tolist()  # wait for the epoch's work, as the training loop does once per epoch
        times.append(time.perf_counter() - start)
    return times


def plain(args: dict) -> list[float]:
    _, trainer, batches, mixer = build(args, 0, 1)
    return timed_epochs(trainer, batches, mixer, args["epochs"])


def ray_worker(args: dict) -> None:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    method, trainer, batches, mixer = build(args, ctx.get_world_rank(), ctx.get_world_size())
    trainer.model = ray.train.torch.prepare_model(method) if ctx.get_world_size() > 1 else method
    times = timed_epochs(trainer, batches, mixer, args["epochs"])
    if ctx.get_world_rank() == 0:  # Train V2 keeps no metrics without a checkpoint: hand them over by file
        Path(args["out"]).write_text(json.dumps(times))
    ray.train.report({})


def through_ray(args: dict, workers: int, storage: str) -> tuple[list[float], float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    args = args | {"out": f"{storage}/times-{workers}.json"}
    TorchTrainer(
        ray_worker, train_loop_config=args,
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": args["threads"] / workers}),
        run_config=RunConfig(name=f"bench-{workers}w-{time.time_ns()}", storage_path=storage),
    ).fit()
    times = json.loads(Path(args["out"]).read_text())
    return times, time.perf_counter() - start - sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    a = parser.parse_args()
    args = vars(a)

    import tempfile

    import ray

    base = plain(args)
    start = time.perf_counter()
    ray.init(address="local", num_cpus=args["threads"], include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    init_s = time.perf_counter() - start
    storage = tempfile.mkdtemp(prefix="bench-ray-")
    one, setup1 = through_ray(args, 1, storage)
    two, setup2 = through_ray(args, 2, storage)
    ray.shutdown()

    def med(times: list[float]) -> float:
        return statistics.median(times[1:] if len(times) > 1 else times)

    rows = [("plain PyTorch", base), ("Ray Train, 1 worker", one), ("Ray Train, 2 workers", two)]
    print(f"{'setting':24} {'median epoch s':>15} {'ratio':>7}   epochs (s)")
    for name, times in rows:
        print(f"{name:24} {med(times):15.2f} {med(times) / med(base):7.3f}   {', '.join(f'{t:.2f}' for t in times)}")
    print(f"start-up: ray.init {init_s:.1f} s; Train set-up + teardown {setup1:.1f} s (1 worker), "
          f"{setup2:.1f} s (2 workers)")
    print(json.dumps({
        "ray_1_worker": {"ratio": round(med(one) / med(base), 4), "median_epoch_s": round(med(one), 3)},
        "ray_2_workers": {"ratio": round(med(two) / med(base), 4), "median_epoch_s": round(med(two), 3)},
        "plain": {"median_epoch_s": round(med(base), 3)},
        "startup_s": {"ray_init": round(init_s, 2), "train_setup_1_worker": round(setup1, 2),
                      "train_setup_2_workers": round(setup2, 2)},
    }))


if __name__ == "__main__":
    main()
