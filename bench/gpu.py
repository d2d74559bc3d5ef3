"""The GPU check: the project's training step, augmentation and evaluation timed on one GPU, and a short
real training on Fashion-MNIST. The last line printed is one JSON object (also written to ``--out``).

Needs torch, torchvision, numpy, pyyaml and pydantic only (no Ray, MLflow, pandas, pyarrow or boto3),
and no install of the project: the script puts the repository on ``sys.path`` itself.

    python bench/gpu.py --out bench/results/nvidia-h200.json --fashion-mnist DIR   # a GPU: < 8 min on an H200
    python bench/gpu.py --device cpu --smoke                                       # the same code, tiny sizes

Timings are medians over ``--repeats`` runs of ``--steps`` steps each, after warm-up; on CUDA, CUDA events
around each run, with no host synchronisation inside the steps (the step's own non-finite-loss check
reads the device once per run, as the training loop does once per ``nan_check_every`` steps).

- ``train_step``: each method (configs/methods/*.yaml) in the paper sweep's CIFAR-10 recipe (its batch size;
  Un-Mix as "both", P 0.5), without (``none``) and with (``unmix``) the mixture: ``unmix_ray.step.Pretrainer``
  on a ResNet-18 with the CIFAR stem over 32 px uint8 images resident on the device. Modes: ``eager`` and
  ``compile`` (torch.compile of the method, as ``train.compile`` does) in bf16 autocast + channels_last, and
  ``fp32_eager`` (the paper sweep's precision). Images/s, FLOPs per step (FlopCounterMode on one eager step),
  TFLOP/s and their fraction of ``--peak-tflops`` (bf16), peak memory; the Un-Mix/base step-time ratio
  beside its floor (``FLOORS`` of bench/step_overhead.py) and beside the ratio of the FLOPs.
- ``resnet50_moco_v2``: the ImageNet cell (ResNet-50, 224 px crops of 256 px images, MoCo v2) at the
  recipe's per-GPU batch (256 over 8 GPUs) and at a full one, with GPU-hours per 200-epoch run.
- ``augment``: ``BatchAugment`` views/s, CIFAR-10 and ImageNet recipes.
- ``evaluation``: feature extraction, the kNN monitor (50,000-image bank, 10,000 queries) and the fast
  linear probe on device tensors; kNN over an ImageNet-sized bank (1,281,167 x 2048).
- ``fashion_mnist``: SimCLR + Un-Mix pretraining on the real data, the kNN of the pretrained against the
  untrained encoder, and bf16 against fp32 losses over the first steps from the same weights and draws.
- ``checks``: those two comparisons; ``ok`` when every check passed and no section failed.
- ``throughput_entry``: the measured figures as configs/throughput.yaml groups (fp32, the paper sweep's
  precision), with the command that measured them.

torch.compile runs for the first method right after the eager steps, and for the others last, as many as
``--budget-s`` leaves time for (the others say why).
``--out`` is rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE):  # run from a checkout without installing it; the helpers sit beside
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gpu_fashion_mnist import BF16_TOLERANCE, fashion_mnist_run  # noqa: E402
from gpu_timing import (  # noqa: E402
    NO_MIX,
    UNMIX,
    Clock,
    GiB,
    count_flops,
    count_syncs,
    device_batches,
    free,
    peak_gib,
    time_steps,
    trainer_for,
    with_rates,
)
from step_overhead import FLOORS  # noqa: E402

from unmix_ray.augment import BatchAugment  # noqa: E402
from unmix_ray.compose import load_sweep  # noqa: E402
from unmix_ray.config import (  # noqa: E402
    CONFIG_DIR,
    DatasetConfig,
    EvalConfig,
    TrialConfig,
)
from unmix_ray.evaluation import extract_features, frozen, knn_predict, linear_probe  # noqa: E402
from unmix_ray.evaluation.knn import query_chunk  # noqa: E402
from unmix_ray.models import build_backbone  # noqa: E402

METHODS = list(FLOORS)
IMAGENET_TRAIN = 1_281_167
KNN_MARGIN = 1.0  # top-1 points by which the pretrained encoder must beat the untrained one


def bench_cell(trial: TrialConfig, args: argparse.Namespace, device: torch.device, clock: Clock, batch: int,
               size: int, crop: int, modes: list[str], cell: dict | None = None) -> dict:
    """One dataset/method cell: every mode in ``modes`` (eager, fp32_eager, compile), none and unmix."""
    cell = cell if cell is not None else {"batch": batch, "floor": FLOORS[trial.method.name]}
    images = torch.randint(0, 256, (args.steps * batch, trial.dataset.channels, size, size), dtype=torch.uint8,
                           device=device)
    batches = device_batches(images, batch, args.steps, seed=0)
    for mode in modes:
        precision, compiled = ("fp32", False) if mode == "fp32_eager" else ("bf16", mode == "compile")
        trainer = trainer_for(trial, device, precision, compiled, batch, crop, args.backbone)
        for variant, mixture in (("none", NO_MIX), ("unmix", UNMIX)):
            entry = cell.setdefault(variant, {})
            if "flops_per_step" not in entry:
                entry["flops_per_step"] = count_flops(trainer, batches, mixture, device)
            warmup = args.compile_warmup if compiled else args.warmup
            timing = time_steps(trainer, batches, mixture, device, clock, warmup, args.repeats)
            if compiled:
                timing["compile_s"] = round(timing["warmup_s"] - warmup * args.steps * timing["step_ms"] / 1e3, 2)
            if mode == "eager":
                timing["host_syncs_per_run"] = count_syncs(trainer, batches, mixture, device)
            peak = None if mode == "fp32_eager" else args.peak_tflops  # the peak is bf16's
            entry[mode] = with_rates(timing, entry["flops_per_step"], peak)
            print(f"  {trial.method.name:<8} {variant:<6} {mode:<10} {entry[mode]['images_per_s']:>10.1f} img/s "
                  f"{entry[mode]['tflops_per_s']:>8.2f} TFLOP/s  peak {entry[mode]['peak_memory_gib']} GiB", flush=True)
        del trainer
        free(device)
        cell.setdefault("ratio", {})[mode] = round(cell["unmix"][mode]["step_ms"] / cell["none"][mode]["step_ms"], 3)
        cell.setdefault("ratio_vs_floor", {})[mode] = round(cell["ratio"][mode] / cell["floor"], 3)
    cell["flop_ratio"] = round(cell["unmix"]["flops_per_step"] / cell["none"]["flops_per_step"], 3)
    return cell


def paper_trials() -> dict[tuple[str, str], TrialConfig]:
    """The paper sweep's no-mixture trials of CIFAR-10 (every method) and of ImageNet (MoCo v2), composed
    from configs/ as ``jobs/sweep.py`` composes them."""
    sweep = load_sweep(CONFIG_DIR / "sweeps" / "paper.yaml",
                       ["grid.seed=[0]", "grid.mixture=[none]", "grid.dataset=[cifar10,imagenet]"])
    return {(t.dataset.name, t.method.name): t for t in sweep.trials if t.variant == "none"}


def train_steps(trials: dict, args: argparse.Namespace, device: torch.device,
                clock: Clock, modes: list[str], out: dict) -> dict:
    for name in args.methods:
        trial = trials["cifar10", name]
        batch = args.batch or trial.train.batch_per_worker
        out[name] = bench_cell(trial, args, device, clock, batch, args.size, args.size, modes, out.get(name))
    return out


def resnet50(trials: dict, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict:
    trial = trials["imagenet", "moco_v2"]
    # Half the steps and fewer runs: a ResNet-50 step at 224 px is ~10x a CIFAR ResNet-18 step.
    args = argparse.Namespace(**vars(args) | {"steps": max(1, args.steps // 2), "repeats": max(2, args.repeats - 2),
                                              "warmup": min(1, args.warmup)})
    out: dict[str, Any] = {"recipe_batch_per_gpu": trial.train.batch_per_worker}
    size, crop = (trial.dataset.image_size, trial.dataset.crop_size) if not args.smoke else (40, 32)
    for batch in args.r50_batch:
        cell = bench_cell(trial, args, device, clock, batch, size, crop, ["eager", "fp32_eager"])
        for variant in ("none", "unmix"):
            for mode in ("eager", "fp32_eager"):
                hours = IMAGENET_TRAIN * trial.train.epochs / cell[variant][mode]["images_per_s"] / 3600
                cell[variant][mode]["gpu_hours_per_run"] = round(hours, 1)  # 200 epochs on one GPU's share
        out[f"batch_{batch}"] = cell
    return out


def augment(trials: dict, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict:
    out = {}
    for key, (ds, batch) in {"cifar10": (trials["cifar10", "simclr"].dataset, 512),
                             "imagenet": (trials["imagenet", "moco_v2"].dataset, 128)}.items():
        size, crop = (ds.image_size, ds.crop_size) if not args.smoke else (args.size, args.size)
        batch = 8 if args.smoke else batch
        aug = BatchAugment(ds.augment, crop, ds.mean, ds.std, torch.Generator(device).manual_seed(0))
        x = torch.randint(0, 256, (batch, ds.channels, size, size), dtype=torch.uint8, device=device)
        view = partial(aug, x)
        clock.runs(view, 3)
        seconds = statistics.median(clock.runs(view, args.repeats * 4))
        out[key] = {"batch": batch, "image_px": size, "crop_px": crop, "views_per_s": round(batch / seconds, 1)}
    return out


def evaluation(trials: dict, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict:
    """The kNN monitor and the fast linear probe of a CIFAR-sized run, and kNN over an ImageNet-sized bank."""
    out = monitor(trials["cifar10", "simclr"].dataset, EvalConfig(linear_epochs=args.linear_epochs), args, device,
                  clock)
    free(device)
    out["knn_imagenet"] = knn_imagenet(EvalConfig(), args, device, clock)
    free(device)
    return out


def monitor(ds: DatasetConfig, ev: EvalConfig, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict:
    n_bank, n_query = (256, 64) if args.smoke else (50_000, 10_000)
    torch.manual_seed(0)
    encoder = build_backbone(args.backbone or "resnet18_cifar", 3).to(device).eval()
    bank, query = (torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, device=device)
                   for n in (n_bank, n_query))
    y_bank, y_query = (torch.randint(0, 10, (n,), device=device) for n in (n_bank, n_query))

    def features(x: torch.Tensor) -> torch.Tensor:
        return extract_features(encoder, x, ds.mean, ds.std, args.size, device, ev.feature_batch_size)

    with frozen(encoder):
        features(query[:1024])
        extract_s, (fb, fq) = clock.once(lambda: (features(bank), features(query)))

    def knn() -> torch.Tensor:
        return knn_predict(fb, y_bank, fq, 10, ev.knn_k, ev.knn_t)

    knn()
    knn_s = statistics.median(clock.runs(knn, 3))
    linear_s, _ = clock.once(lambda: linear_probe(fb, y_bank, fq, y_query, 10, ev))
    return {"extract_images_per_s": round((n_bank + n_query) / extract_s, 1),
            "knn": {"bank": n_bank, "queries": n_query, "k": ev.knn_k, "seconds": round(knn_s, 4),
                    "chunk": query_chunk(n_bank, fb.dtype)},
            "linear_probe": {"train": n_bank, "test": n_query, "epochs": ev.linear_epochs,
                             "batch": ev.linear_batch_size, "seconds": round(linear_s, 3),
                             "seconds_per_epoch": round(linear_s / ev.linear_epochs, 4)}}


def knn_imagenet(ev: EvalConfig, args: argparse.Namespace, device: torch.device, clock: Clock) -> dict:
    n_bank, n_query, dim = (4096, 128, 64) if args.smoke else (IMAGENET_TRAIN, 50_000, 2048)
    fb, fq = torch.randn(n_bank, dim, device=device), torch.randn(n_query, dim, device=device)
    y_bank = torch.randint(0, 1000, (n_bank,), device=device)
    knn_predict(fb, y_bank, fq[:64], 1000, ev.knn_k, ev.knn_t)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    seconds, _ = clock.once(lambda: knn_predict(fb, y_bank, fq, 1000, ev.knn_k, ev.knn_t))
    peak = peak_gib(device)
    return {"bank": n_bank, "dim": dim, "queries": n_query, "k": ev.knn_k, "seconds": round(seconds, 3),
            "chunk": query_chunk(n_bank, fb.dtype), "peak_memory_gib": peak,
            "peak_above_inputs_gib": None if peak is None else round(peak - base / GiB, 3)}


def checks(result: dict) -> dict:
    out = {}
    syncs = {f"{m}/{v}": cell[v]["eager"].get("host_syncs_per_run") for m, cell in result.get("train_step", {}).items()
             for v in ("none", "unmix") if "eager" in cell.get(v, {})}
    if syncs and None not in syncs.values():  # counted on CUDA only
        out["no_host_sync_inside_steps"] = {
            "ok": all(n <= 1 for n in syncs.values()),
            "detail": f"host synchronisations per run of {result['settings']['steps']} steps (1 allowed: the "
                      f"non-finite-loss check at the end): {syncs}"}
    fm = result.get("fashion_mnist")
    if not fm:
        return out
    cmp = fm["bf16_vs_fp32"]
    return out | {
        "pretrained_beats_untrained_knn": {
            "ok": fm["knn_top1_pretrained"] >= fm["knn_top1_untrained"] + KNN_MARGIN,
            "detail": f"kNN top-1 {fm['knn_top1_pretrained']} pretrained against {fm['knn_top1_untrained']} "
                      f"untrained (margin {KNN_MARGIN} points)"},
        "bf16_matches_fp32": {
            "ok": cmp["max_rel_diff"] <= BF16_TOLERANCE,
            "detail": f"largest relative loss difference over {cmp['steps']} steps {cmp['max_rel_diff']} "
                      f"(tolerance {BF16_TOLERANCE})"},
    }


def throughput_entry(result: dict, gpu: str | None, command: str) -> list[dict]:
    """Groups for configs/throughput.yaml: fp32 base-method samples/s (the paper sweep's precision)."""
    groups, steps, r50 = [], result.get("train_step", {}), result.get("resnet50_moco_v2", {})
    rates = {m: c["none"]["fp32_eager"]["images_per_s"] for m, c in steps.items() if "fp32_eager" in c.get("none", {})}
    if rates:
        groups.append({"datasets": ["cifar10", "cifar100"], "backbone": "resnet18_cifar", "samples_per_s": rates})
    cells = [v for k, v in r50.items() if k.startswith("batch_")]
    recipe = r50.get(f"batch_{r50.get('recipe_batch_per_gpu')}") or next(iter(cells), None)
    if recipe and "fp32_eager" in recipe["none"]:
        groups.append({"datasets": ["imagenet"], "backbone": "resnet50",
                       "samples_per_s": {"moco_v2": recipe["none"]["fp32_eager"]["images_per_s"]}})
    return [g | {"gpu": gpu, "measured": True, "command": command} for g in groups]


def table_gpu(device_name: str) -> str | None:
    names = [g["name"] for g in yaml.safe_load((CONFIG_DIR / "throughput.yaml").read_text())["gpus"]]
    return next((n for n in names if n in device_name.lower()), None)


# Sizes: (full, --smoke, what). 0 for --batch: each method's recipe batch; "" for --backbone: the recipe's.
SIZES: dict[str, tuple[Any, Any, str]] = {
    "steps": (10, 1, "steps per timed run"), "repeats": (5, 2, "timed runs (the median is reported)"),
    "warmup": (2, 0, "untimed runs first"), "compile_warmup": (2, 1, "untimed runs first, compiled"),
    "size": (32, 8, "image side of the CIFAR-shaped data"), "batch": (0, 16, "images per step"),
    "backbone": ("", "resnet_narrow", "backbone of the timed steps"),
    "r50_batch": ([32, 256], [2], "ResNet-50 batches (32: the recipe's 256 over 8 GPUs)"),
    "linear_epochs": (100, 2, "epochs of the fast linear probe"),
    "fm_epochs": (3, 1, "Fashion-MNIST pretraining epochs"), "fm_train": (60000, 64, "Fashion-MNIST train images"),
    "fm_test": (10000, 64, "Fashion-MNIST test images"), "fm_batch": (256, 16, "Fashion-MNIST batch"),
    "fm_backbone": ("resnet18_cifar", "resnet_narrow", "Fashion-MNIST backbone"),
    "fm_compare_steps": (5, 2, "steps of the bf16 against fp32 comparison"),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: the same code path in seconds")
    ap.add_argument("--out", type=Path, help="also write the JSON here (rewritten after every section)")
    ap.add_argument("--fashion-mnist", default="/usr/share/datasets/fashion-mnist", help="folder of the idx .gz files")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--peak-tflops", type=float, default=790.0,
                    help="the GPU's dense bf16 peak; 790: an H200's 8192^3 bf16 matmul rate (989 on its data sheet)")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds: a method's torch.compile starts only if it should end within this")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="auto: on unless --smoke (on a CPU, inductor's C++ build takes minutes)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    for key, (full, smoke, what) in SIZES.items():
        kind = {"type": int, "nargs": "+"} if isinstance(full, list) else {"type": type(full)}
        ap.add_argument(f"--{key.replace('_', '-')}", default=None, help=f"{what} ({full} / --smoke {smoke})", **kind)
    args = ap.parse_args(argv)
    for key, (full, smoke, _) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else full)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    start = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: --device cpu (with --smoke for tiny sizes) runs the same code on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    clock = Clock(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    command = shlex.join(["python", "bench/gpu.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {
        "kind": "-".join(name.lower().split()) if device.type == "cuda" else "cpu", "device": name,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "smoke": args.smoke, "command": command, "peak_tflops_bf16": args.peak_tflops,
        # fp32 is the training loop's: torch's defaults, TF32 convolutions and fp32 matrix products.
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "errors": {}, "complete": False,
    }
    print(f"{name}, torch {torch.__version__}, {'smoke' if args.smoke else 'full'} sizes", flush=True)

    def write() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    def section(key: str, fn: Callable[[], Any]) -> None:
        print(f"{key} ({time.monotonic() - start:.0f} s)", flush=True)
        try:
            result[key] = fn()
        except Exception as e:  # one failed section must not lose the others' figures
            traceback.print_exc()
            result["errors"][key] = f"{type(e).__name__}: {e}"
            free(device)
        write()

    trials = paper_trials()
    steps: dict[str, Any] = {}
    use_compile = args.compile == "on" or (args.compile == "auto" and not args.smoke)
    seen: list[float] = []  # seconds each method's compile section took

    def compiled(method: str) -> None:
        """The compiled step of ``method``, if the time budget allows it (else why not)."""
        cell = steps.setdefault(method, {})
        left = args.budget_s - (time.monotonic() - start)
        cost = max(seen, default=90.0)  # until one is seen: two compilations of a ResNet-18 step
        if not use_compile or left < cost:
            why = (f"time budget: {left:.0f} s of --budget-s left, compiling takes ~{cost:.0f} s" if use_compile
                   else "--smoke: torch.compile skipped (its C++/Triton build takes minutes); --compile on runs it")
            for variant in ("none", "unmix"):
                cell.setdefault(variant, {})["compile"] = {"skipped": why}
            return
        began = time.monotonic()
        one = argparse.Namespace(**vars(args) | {"methods": [method]})
        section(f"compile_{method}", lambda: train_steps(trials, one, device, clock, ["compile"], steps)[method])
        result.pop(f"compile_{method}", None)  # the figures are in the method's cell
        seen.append(time.monotonic() - began)

    section("train_step", lambda: train_steps(trials, args, device, clock, ["eager", "fp32_eager"], steps))
    compiled(args.methods[0])  # early, so that one compiled step is measured; the others last, as time allows
    section("resnet50_moco_v2", lambda: resnet50(trials, args, device, clock))
    section("augment", lambda: augment(trials, args, device, clock))
    section("evaluation", lambda: evaluation(trials, args, device, clock))
    section("fashion_mnist", lambda: fashion_mnist_run(trials, args, device, clock))
    for method in args.methods[1:]:
        compiled(method)
    result["train_step"] = steps

    result["checks"] = checks(result)
    result["throughput_entry"] = throughput_entry(result, table_gpu(name), command)
    result["ok"] = not result["errors"] and all(c["ok"] for c in result["checks"].values()) and bool(result["checks"])
    result["elapsed_s"] = round(time.monotonic() - start, 1)
    result["complete"] = True
    write()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res["ok"] or (res["smoke"] and not res["errors"]) else 1)
