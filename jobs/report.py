"""Print, save and log to MLflow the results table: baseline against Un-Mix, with every protocol.

    python jobs/report.py                 # the newest sweep in the experiment
    python jobs/report.py --sweep demo    # the newest instance of sweep "demo", or a sweep id
    python jobs/report.py --all           # every trial of the experiment (all its sweeps)

The table is printed (Markdown), saved as results/<sweep id>.md and .csv, and logged on the sweep's
run (or, with --all, on the experiment's "results" run) as an MLflow table plus CSV and Markdown
artifacts, with the pictures (delta heatmap, baseline-vs-Un-Mix bars, per-run curves) unless --no-plots.
"""

from __future__ import annotations

import argparse
import sys

import _path  # noqa: F401
from mlflow.tracking import MlflowClient

from unmix_ray.orchestration import tracking
from unmix_ray.orchestration.render import log_results, save_results
from unmix_ray.orchestration.results import build_results
from unmix_ray.redact import redact


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--sweep", help="sweep name (newest instance) or sweep id")
    which.add_argument("--all", action="store_true", help="every trial run of the experiment, all sweeps together")
    parser.add_argument("--experiment", default="unmix-ray")
    parser.add_argument("--out", default="results", help="folder for the Markdown and CSV copies (default: results)")
    parser.add_argument("--no-log", action="store_true", help="print and save only; log nothing to MLflow")
    parser.add_argument("--no-plots", action="store_true", help="log the table but not the pictures")
    args = parser.parse_args(argv)
    uri = tracking.tracking_uri()
    if not tracking.store_exists(uri):
        print(f"error: no MLflow store at {redact(uri)} (set MLFLOW_TRACKING_URI)", file=sys.stderr)
        return 2
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(args.experiment)
    if args.all:
        sweep_id = None
        if exp is None:
            print(f"error: no experiment {args.experiment!r} at {redact(uri)}", file=sys.stderr)
            return 2
    else:
        sweep_id = tracking.latest_sweep_id(uri, args.experiment, args.sweep)
        if sweep_id is None:
            print(f"error: no sweep {args.sweep or ''} in experiment {args.experiment!r} at {redact(uri)}",
                  file=sys.stderr)
            return 2
    table = build_results(uri, args.experiment, sweep_id)
    print(f"Results of {f'sweep {sweep_id}' if sweep_id else f'every sweep in {args.experiment!r}'}:\n")
    print(table.markdown())
    md, csv = save_results(table, args.out)
    print(f"\nSaved {md} and {csv}")
    if args.no_log:
        return 0
    if sweep_id:
        run_id = tracking.find_runs(client, exp.experiment_id,
                                    **{tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP_ID: sweep_id})[0].info.run_id
    else:
        run_id = tracking.results_run(client, exp.experiment_id, args.experiment)
    log_results(client, run_id, table)
    if not args.no_plots:
        from unmix_ray.orchestration.plots import log_sweep_plots

        log_sweep_plots(client, run_id, uri, args.experiment, sweep_id, table=table)
    print(f"Logged to MLflow run {run_id} (artifacts results/ and plots/) at {redact(uri)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
