"""How much memory a running trial keeps on the cluster's head, measured: a sweep runs on a local Ray
(the head and the only node) and the resident memory of every Ray process is sampled while the
trials run, by kind (from each process's title).

A trial keeps three processes on the head of our cluster files (trial drivers are placed there by the
``trial_driver`` resource): its Tune trial driver (``ImplicitFunc``), Ray Train's controller and its
placement-group cleaner. The training workers run on GPU nodes and are not counted; the head's fixed
part (GCS, raylet, the sweep driver; the MLflow server runs beside them on the AWS head) is reported as
``base`` from the same samples.

    python bench/head_memory.py [--trials 2] [--epochs 3]

Last line: one JSON object {"per_trial_mib": ..., "by_kind_mib": {...}, "base_mib": ..., "samples": n}.
Enter its figures in configs/head_memory.yaml with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Process-title fragments of what a running trial keeps on the head, and of the head's own processes.
PER_TRIAL = {"trial driver": "ImplicitFunc", "Train controller": "TrainController",
             "placement-group cleaner": "PlacementGroupCleaner"}
BASE = {"GCS": "gcs_server", "raylet": "raylet"}


def sample(driver_pid: int) -> dict[str, list[int]]:
    """Resident bytes of every process of interest, by kind (one entry per process)."""
    out: dict[str, list[int]] = defaultdict(list)
    for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        rss = p.info["memory_info"].rss if p.info["memory_info"] else 0
        if p.info["pid"] == driver_pid:
            out["sweep driver"].append(rss)
            continue
        for kind, fragment in (PER_TRIAL | BASE).items():
            if fragment in cmd:
                out[kind].append(rss)
                break
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2, help="trials running at once")
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)

    from unmix_ray.compose import load_sweep
    from unmix_ray.orchestration.local_ray import start_local, stop_local
    from unmix_ray.orchestration.sweep import run_sweep

    tmp = Path(tempfile.mkdtemp(prefix="head-memory-"))
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", [
        "grid.mixture=[none, both]", "untrained_reference=false", f"train.epochs={args.epochs}",
        "train.batch_size=64", "datasets.fashion_mnist.train_subset=2048", "datasets.fashion_mnist.test_subset=500",
        "eval.linear_epochs=2", "eval.knn_k=20", f"tune.max_concurrent_trials={args.trials}",
        f"tune.storage_path={tmp / 'ray'}", f"grid.seed=[{', '.join(str(i) for i in range(args.trials))}]"])
    start_local(num_cpus=max(2, args.trials), resources={"trial_driver": 8}, log_to_driver=False)
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(table=run_sweep(sweep, f"sqlite:///{tmp / 'm.db'}")))
    thread.start()
    samples: list[dict[str, list[int]]] = []
    while thread.is_alive():
        s = sample(psutil.Process().pid)
        if len(s.get("Train controller", [])) >= args.trials:  # every trial running
            samples.append(s)
        time.sleep(1.0)
    thread.join()
    stop_local()
    if not samples:
        print("error: never saw the trials running together", file=sys.stderr)
        return 1
    mib = 2**20

    def median_per_process(kind: str) -> float:
        return statistics.median(v for s in samples for v in s.get(kind, [])) / mib

    by_kind = {k: round(median_per_process(k), 1) for k in (*PER_TRIAL, *BASE, "sweep driver")}
    per_trial = sum(by_kind[k] for k in PER_TRIAL)
    base = sum(by_kind[k] for k in (*BASE, "sweep driver"))
    for kind, value in by_kind.items():
        print(f"{kind:26} {value:8.1f} MiB per process")
    print(f"per running trial on the head: {per_trial:.0f} MiB; base: {base:.0f} MiB "
          f"({len(samples)} samples with {args.trials} trials running)")
    print(json.dumps({"per_trial_mib": round(per_trial, 1), "by_kind_mib": by_kind, "base_mib": round(base, 1),
                      "samples": len(samples), "trials": args.trials}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
