"""Run an Un-Mix sweep: Ray Tune over trials, each a Ray Train pretraining + evaluation, tracked in MLflow.

    python jobs/sweep.py                                  # the CPU demo on an embedded local Ray
    python jobs/sweep.py --config configs/sweeps/X.yaml --set train.epochs=2 --set grid.seed=[0,1]
    python jobs/sweep.py --resume demo                    # the newest instance of sweep "demo" (or an id)
    python jobs/sweep.py --config configs/sweeps/paper.yaml --dry-run --cluster cluster/aws-gpu.yaml
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweeps/demo.yaml

MLflow: ``MLFLOW_TRACKING_URI`` if set, else ./mlflow.db. The config, the data on this machine and
whether every trial can fit are checked before Ray starts; a problem exits with status 2 and says what
is wrong. Ctrl-C or SIGTERM stops the sweep (runs marked KILLED; exit status 130 or 143); resume it
with --resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import _path  # noqa: F401

from unmix_ray.compose import compose_sweep, load_sweep
from unmix_ray.config import CONFIG_DIR, ConfigError, Sweep, apply_overrides
from unmix_ray.redact import redact

DEMO = "configs/sweeps/demo.yaml"


def fail(message: str) -> int:
    print(f"error: {redact(message)}", file=sys.stderr)
    return 2


def resolve(args: argparse.Namespace, uri: str) -> tuple[Sweep, str | None, dict]:
    """The sweep to run, the id of the instance to resume (or None) and its composed YAML; raises
    ConfigError or LookupError (nothing found to resume)."""
    from unmix_ray.orchestration import tracking

    if args.resume is None:
        path = args.config or DEMO
        sweep = load_sweep(path, args.set)
        from unmix_ray.config import read_yaml

        full = path if os.path.isfile(path) else str(CONFIG_DIR.parent / path)
        return sweep, None, apply_overrides(read_yaml(full), args.set)
    found = tracking.find_sweep(uri, args.resume) if tracking.store_exists(uri) else None
    if found is None:
        raise LookupError(f"no sweep named or with id {args.resume!r} in MLflow at {uri} (its config and id are "
                          "read from the sweep's run; check MLFLOW_TRACKING_URI)")
    run, data = found
    sweep_id = run.data.tags[tracking.TAG_SWEEP_ID]
    if args.config:
        from unmix_ray.config import read_yaml

        data = read_yaml(args.config)
    data = apply_overrides(data, args.set)
    return compose_sweep(data, source=f"sweep {sweep_id}"), sweep_id, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"sweep YAML (default: {DEMO}; with --resume: the sweep's own)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a sweep key (dotted path, YAML value); repeatable")
    parser.add_argument("--resume", metavar="NAME_OR_ID",
                        help="resume a stopped sweep: its id, or its name for the newest instance")
    parser.add_argument("--cluster", metavar="YAML",
                        help="the cluster at full scale: a Ray launcher config or a KubeRay RayCluster/RayJob")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the trial plan and the GPU-hour estimate; run nothing")
    parser.add_argument("--verbose", action="store_true", help="Ray's, Tune's and MLflow's own output too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for name in ("mlflow", "alembic", "ray"):
            logging.getLogger(name).setLevel(logging.WARNING)

    from unmix_ray.orchestration import tracking

    uri = tracking.tracking_uri()
    try:
        sweep, sweep_id, data = resolve(args, uri)
    except ConfigError as e:
        return fail(str(e))
    except LookupError as e:
        return fail(str(e))
    if args.cluster and not os.path.isfile(args.cluster):
        return fail(f"--cluster {args.cluster}: no such file")

    if args.dry_run:
        from unmix_ray.orchestration.plan import format_plan, plan_for

        print(format_plan(plan_for(sweep, args.cluster)))
        return 0

    from unmix_ray.orchestration.preflight import check_local_data, local_feasibility

    on_cluster = bool(args.cluster or os.environ.get("RAY_ADDRESS"))
    problems = check_local_data(sweep, absent_is_remote=on_cluster)
    if not on_cluster:
        problems += local_feasibility(sweep)
    if problems:
        return fail("the sweep cannot run as configured (nothing was started):\n  - " + "\n  - ".join(problems))

    from unmix_ray.orchestration.sweep import SweepError, SweepInterrupted, run_sweep

    try:
        table = run_sweep(sweep, uri, sweep_id=sweep_id, cluster=args.cluster, verbose=args.verbose,
                          config_data=data)
    except SweepError as e:
        return fail(str(e))
    except SweepInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\nstopped at once: the sweep's unfinished runs are KILLED", file=sys.stderr)
        return 130
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
