"""Training-step cost of Un-Mix per method: median step time with the mixture and without.

Both kinds of step run in the same process on the same model and batch, interleaved (and their
order alternated) so that drifting machine load hits both alike; warm-up steps are excluded. A step
is what the training loop does: draw the mixture (Un-Mix only), forward, backward, optimiser step,
``after_step``. The method recipes come from ``configs/methods/<name>.yaml``.

Clock: on CUDA, wall time with the device synchronised. On CPU, by default the process's CPU time
(``--clock cpu``): on a shared machine wall time also counts the neighbours' work, while CPU time
only counts this process's; with one thread on an idle machine the two agree.

The floor is the extra encoder work Un-Mix implies, counting a backward pass as two forwards:
SimCLR, BYOL (mixture through both branches) and SwAV add one trained pass to two (1.5); asymmetric
MoCo adds one trained pass (3 units) to one trained query pass and one key forward (4 units): 1.75.

    python bench/step_overhead.py --steps 5                       # CPU
    python bench/step_overhead.py --device cuda --bf16 --channels-last --steps 30

The last line printed is one JSON object: {"<method>": {"ratio": r, "floor": f}, ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(ROOT))

from unmix_ray.config import (  # noqa: E402
    CONFIG_DIR,
    MethodConfig,
    MixtureConfig,
    build,  # noqa: E402
)
from unmix_ray.methods import build_method  # noqa: E402
from unmix_ray.models import resnet18_cifar  # noqa: E402
from unmix_ray.optim import build_optimizer  # noqa: E402
from unmix_ray.unmix import MixtureSampler  # noqa: E402

FLOORS = {"simclr": 1.5, "byol": 1.5, "moco_v1": 1.75, "moco_v2": 1.75, "swav": 1.5}


def load_method(name: str) -> MethodConfig:
    with open(CONFIG_DIR / "methods" / f"{name}.yaml") as f:
        return build(MethodConfig, yaml.safe_load(f), f"methods/{name}.yaml")


def bench_method(name: str, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    config = load_method(name)
    method = build_method(config, resnet18_cifar()).to(device).train()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    method = method.to(memory_format=fmt)
    opt = build_optimizer(method, config.optim, args.batch)
    sampler = MixtureSampler(MixtureConfig(type="both", prob=0.5), seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x0, x1 = (torch.randn(args.batch, 3, 32, 32, generator=g).to(device, memory_format=fmt) for _ in range(2))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def step(unmix: bool, i: int, total: int) -> float:
        sync()
        start = clock()
        mixture = sampler(x0) if unmix else None
        with torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext():
            out = method(x0, x1, mixture)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        method.after_step(i / total)
        sync()
        if not torch.isfinite(out.total):
            raise RuntimeError(f"{name}: loss is not finite")
        return clock() - start

    times: dict[bool, list[float]] = {False: [], True: []}
    total = args.warmup + args.steps
    for i in range(total):
        for unmix in ((False, True) if i % 2 == 0 else (True, False)):
            dt = step(unmix, i, total)
            if i >= args.warmup:
                times[unmix].append(dt)
    base, mixed = statistics.median(times[False]), statistics.median(times[True])
    return {"base_s": base, "unmix_s": mixed, "ratio": mixed / base, "floor": FLOORS[name],
            "base_img_s": args.batch / base, "unmix_img_s": args.batch / mixed}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(FLOORS), choices=list(FLOORS))
    parser.add_argument("--batch", type=int, default=32, help="images per view (even)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind first")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=["wall", "cpu"], default=None,
                        help="step timer: wall time, or process CPU time (default: cpu on CPU, wall on CUDA)")
    args = parser.parse_args(argv)
    if args.clock is None:
        args.clock = "wall" if args.device.startswith("cuda") else "cpu"
    if args.clock == "cpu" and args.device.startswith("cuda"):
        parser.error("--clock cpu does not see GPU work; use wall on CUDA")
    if args.batch % 2:
        parser.error("--batch must be even (Un-Mix pairs sample i with sample N-1-i)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True

    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"resnet18_cifar, batch {args.batch} per view, 3x32x32, {where}, bf16={args.bf16}, "
          f"channels_last={args.channels_last}, median of {args.steps} steps after {args.warmup} warm-up, "
          f"{args.clock} clock")
    # img/s: training images (one per pair of views) per second, batch / step time.
    header = f"{'method':<8} {'base s':>8} {'unmix s':>8} {'ratio':>6} {'floor':>6} {'vs floor':>8}" \
             f" {'base img/s':>10} {'unmix img/s':>11}"
    print(header)
    results = {}
    for name in args.methods:
        r = bench_method(name, args)
        results[name] = r
        print(f"{name:<8} {r['base_s']:8.3f} {r['unmix_s']:8.3f} {r['ratio']:6.3f} {r['floor']:6.2f}"
              f" {r['ratio'] / r['floor'] - 1:+8.1%} {r['base_img_s']:10.1f} {r['unmix_img_s']:11.1f}",
              flush=True)
    print(json.dumps({n: {"ratio": round(r["ratio"], 3), "floor": r["floor"]} for n, r in results.items()}))
    return results


if __name__ == "__main__":
    main()
