"""Run an Un-Mix sweep: Ray Tune over trials, each a Ray Train pretraining + evaluation, tracked in MLflow.

    python jobs/sweep.py                                  # the CPU demo on an embedded local Ray
    python jobs/sweep.py --config configs/sweeps/X.yaml --set train.epochs=2 --set grid.seed=[0,1]
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweeps/demo.yaml

MLflow: ``MLFLOW_TRACKING_URI`` if set, else ./mlflow.db. The config is validated before Ray starts.
"""

from __future__ import annotations

import argparse
import logging
import sys

import _path  # noqa: F401

from unmix_ray.compose import load_sweep
from unmix_ray.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/sweeps/demo.yaml", help="sweep YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep key (dotted path, YAML value); repeatable")
    parser.add_argument("--resume", metavar="SWEEP_ID", help="resume an interrupted sweep by its id")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the trial plan and the GPU-hour estimate; run nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        sweep = load_sweep(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        from unmix_ray.orchestration.plan import format_plan, plan_sweep

        print(format_plan(plan_sweep(sweep)))
        return 0

    from unmix_ray.orchestration import tracking
    from unmix_ray.orchestration.sweep import run_sweep
    from unmix_ray.redact import redact

    uri = tracking.tracking_uri()
    table = run_sweep(sweep, uri, sweep_id=args.resume)
    print(f"\nResults of sweep {table.sweep_id} ({len(sweep.trials)} trials):\n")
    print(table.markdown())
    print(f"\nMLflow: runs and the table are in experiment {sweep.config.experiment!r} at {redact(uri)}")
    if uri.startswith("sqlite:"):
        print(f"Open the UI with:  mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)")
    else:
        print(f"Open the UI at:    {redact(uri)}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
