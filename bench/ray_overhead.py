"""What Ray Train costs per epoch: the same epochs in a plain PyTorch loop and through Ray Train.

Same code (``unmix_ray.step.Pretrainer``), model (narrow ResNet, SimCLR with Un-Mix ``both``),
data (a Fashion-MNIST subset) and global batch in every setting; the CPU threads in use are the same
too (plain: one process with T threads; Ray 1 worker: T threads; Ray 2 workers: T/2 threads each, each
on half of every global batch, DDP over gloo). Per-epoch times exclude the first (warm-up) epoch.
Cluster start-up and each trial's fixed cost (Train's set-up and teardown: one ``TorchTrainer.fit()``
minus its epochs) are reported separately, for the embedded Ray a sweep starts on a laptop
(``unmix_ray.orchestration.local_ray.start_local``: loopback, no dashboard, no Train preemption
watcher or metrics export) and, with ``--compare-defaults``, for Ray's defaults in the same run.

    python bench/ray_overhead.py [--epochs 4] [--images 4096] [--batch 128] [--threads 2] [--compare-defaults]

Last line: one JSON object {"embedded": {"ray_1_worker": {"ratio": r, ...}, "ray_2_workers": {...},
"startup_s": {...}}, "defaults": {...}, "plain": {...}}.
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


def measure(args: dict, embedded: bool) -> dict:
    """Epoch times through Ray Train (1 and 2 workers) and the fixed costs, on a fresh Ray."""
    import tempfile

    import ray

    from unmix_ray.orchestration.local_ray import start_local, stop_local

    runtime_env = {"env_vars": {"PYTHONPATH": str(ROOT)}}
    start = time.perf_counter()
    if embedded:
        start_local(num_cpus=args["threads"], runtime_env=runtime_env)
    else:
        ray.init(address="local", num_cpus=args["threads"], runtime_env=runtime_env)
    init_s = time.perf_counter() - start
    storage = tempfile.mkdtemp(prefix="bench-ray-")
    one, setup1 = through_ray(args, 1, storage)
    two, setup2 = through_ray(args, 2, storage)
    if embedded:
        stop_local()
    else:
        ray.shutdown()  # never `ray stop`: it would stop every Ray on the machine, a user's too
    return {"one": one, "two": two, "setup1": setup1, "setup2": setup2, "init_s": init_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--compare-defaults", action="store_true",
                        help="also measure on a Ray started with its defaults (dashboard, Train's support actors)")
    a = parser.parse_args()
    args = {k: v for k, v in vars(a).items() if k != "compare_defaults"}

    base = plain(args)
    results = {"embedded": measure(args, embedded=True)}
    if a.compare_defaults:
        results["defaults"] = measure(args, embedded=False)

    def med(times: list[float]) -> float:
        return statistics.median(times[1:] if len(times) > 1 else times)

    print(f"{'setting':34} {'median epoch s':>15} {'ratio':>7}   epochs (s)")
    print(f"{'plain PyTorch':34} {med(base):15.2f} {1:7.3f}   {', '.join(f'{t:.2f}' for t in base)}")
    out: dict = {"plain": {"median_epoch_s": round(med(base), 3)}}
    for label, r in results.items():
        for key, name in (("one", "1 worker"), ("two", "2 workers")):
            times = r[key]
            print(f"{f'Ray Train ({label}), {name}':34} {med(times):15.2f} {med(times) / med(base):7.3f}   "
                  f"{', '.join(f'{t:.2f}' for t in times)}")
        print(f"  {label}: Ray start {r['init_s']:.1f} s; per-trial Train set-up + teardown {r['setup1']:.1f} s "
              f"(1 worker), {r['setup2']:.1f} s (2 workers)")
        out[label] = {
            "ray_1_worker": {"ratio": round(med(r["one"]) / med(base), 4), "median_epoch_s": round(med(r["one"]), 3)},
            "ray_2_workers": {"ratio": round(med(r["two"]) / med(base), 4), "median_epoch_s": round(med(r["two"]), 3)},
            "startup_s": {"ray_init": round(r["init_s"], 2), "train_setup_1_worker": round(r["setup1"], 2),
                          "train_setup_2_workers": round(r["setup2"], 2)},
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
