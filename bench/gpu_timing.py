"""How bench/gpu.py builds and times a training step: the training loop's ``Pretrainer`` set up without
Ray, batches resident on the device, CUDA-event timing of repeated runs, FLOPs of one step."""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from unmix_ray.augment import BatchAugment
from unmix_ray.config import MixtureConfig, TrialConfig
from unmix_ray.methods import build_method
from unmix_ray.models import build_backbone
from unmix_ray.optim import build_optimizer, build_scheduler
from unmix_ray.step import Pretrainer
from unmix_ray.unmix import MixtureSampler

GiB = 2 ** 30
UNMIX = MixtureConfig(type="both", prob=0.5, beta=1.0)  # the paper sweep's "both" variant
NO_MIX = MixtureConfig(type="none")


class Clock:
    """Wall time of repeated calls: CUDA events around each, read after the last (one synchronisation)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def runs(self, fn: Callable[[], Any], n: int) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                fn()
                out.append(time.perf_counter() - start)
            return out
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in marks:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in marks]

    def once(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


def free(device: torch.device) -> None:
    """Give the memory of dropped models back to the GPU and start counting a new peak."""
    if device.type == "cuda":  # (a full collection costs ~1 s in a process holding torch; needless on a CPU)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / GiB, 3) if device.type == "cuda" else None


def device_batches(images: torch.Tensor, batch: int, steps: int, seed: int) -> list[tuple[torch.Tensor, None]]:
    """``steps`` batches drawn from ``images`` on their device (a seeded permutation; no host round trip)."""
    g = torch.Generator(images.device).manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=g, device=images.device)
    return [(images[order[(i * batch) % images.shape[0]:][:batch]], None) for i in range(steps)]


def trainer_for(trial: TrialConfig, device: torch.device, precision: str, compiled: bool, batch: int,
                crop: int, backbone: str = "", seed: int = 0, schedule: tuple[int, int] = (1000, 1000)) -> Pretrainer:
    """The training loop's Pretrainer for ``trial``'s method and backbone (``train_loop_per_worker``'s set-up
    without Ray: no DDP, one process)."""
    torch.manual_seed(seed)
    ds = trial.dataset
    method = build_method(trial.method, build_backbone(backbone or trial.train.backbone, ds.channels)).to(device)
    method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(method, trial.method.optim, batch)
    scheduler = build_scheduler(optimizer, trial.method.optim, *schedule, batch)  # (steps per epoch, epochs)
    augment = BatchAugment(ds.augment, crop, ds.mean, ds.std, torch.Generator(device).manual_seed(seed))
    model = torch.compile(method) if compiled else method
    return Pretrainer(model, method, optimizer, scheduler, augment, precision, True, nan_check_every=10 ** 9)


def time_steps(trainer: Pretrainer, batches: list, mixture: MixtureConfig, device: torch.device, clock: Clock,
               warmup: int, repeats: int) -> dict[str, float]:
    mixer, done = MixtureSampler(mixture, seed=0), [0]

    def run() -> None:
        trainer.epoch(batches, mixer, device, done[0], 10 ** 9)
        done[0] += len(batches)

    warm_s, _ = clock.once(lambda: [run() for _ in range(warmup)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_s = statistics.median(clock.runs(run, repeats)) / len(batches)
    batch = batches[0][0].shape[0]
    return {"step_ms": round(step_s * 1e3, 3), "images_per_s": round(batch / step_s, 1),
            "steps_timed": repeats * len(batches), "warmup_s": round(warm_s, 2), "peak_memory_gib": peak_gib(device)}


def count_flops(trainer: Pretrainer, batches: list, mixture: MixtureConfig, device: torch.device) -> int:
    """FLOPs of one training step (forward, backward, optimiser and augmentation), as FlopCounterMode counts."""
    with FlopCounterMode(display=False) as counter:
        trainer.epoch(batches[:1], MixtureSampler(mixture, seed=0), device, 0, 10 ** 9)
    return counter.get_total_flops()


def count_syncs(trainer: Pretrainer, batches: list, mixture: MixtureConfig, device: torch.device) -> int | None:
    """Host synchronisations in one run of ``batches``, as CUDA's sync debug mode reports them (the training
    step's own non-finite-loss check at the end of the run is one). None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not once per line of code
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.epoch(batches, MixtureSampler(mixture, seed=0), device, 0, 10 ** 9)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def with_rates(timing: dict, flops: int, peak_tflops: float | None) -> dict:
    tflops = flops / (timing["step_ms"] / 1e3) / 1e12
    out = timing | {"tflops_per_s": sig(tflops)}
    return out | ({"fraction_of_peak": sig(tflops / peak_tflops)} if peak_tflops else {})
