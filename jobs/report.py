"""Print (and log to MLflow) the results table of a sweep: baseline against Un-Mix.

    python jobs/report.py                 # the newest sweep in the experiment
    python jobs/report.py --sweep demo    # the newest instance of sweep "demo", or a sweep id
"""

from __future__ import annotations

import argparse
import sys

import _path  # noqa: F401
from mlflow.tracking import MlflowClient

from unmix_ray import tracking
from unmix_ray.redact import redact
from unmix_ray.report import build_results, latest_sweep_id, log_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", help="sweep name (newest instance) or sweep id")
    parser.add_argument("--experiment", default="unmix-ray")
    parser.add_argument("--no-log", action="store_true", help="print only; do not log the table to MLflow")
    args = parser.parse_args(argv)
    uri = tracking.tracking_uri()
    sweep_id = latest_sweep_id(uri, args.experiment, args.sweep)
    if sweep_id is None:
        print(f"error: no sweep {args.sweep or ''} in experiment {args.experiment!r} at {redact(uri)}",
              file=sys.stderr)
        return 2
    table = build_results(uri, args.experiment, sweep_id)
    print(f"Results of sweep {sweep_id}:\n")
    print(table.markdown())
    if not args.no_log:
        client = MlflowClient(uri)
        run = tracking.find_runs(client, client.get_experiment_by_name(args.experiment).experiment_id,
                                 **{tracking.TAG_ROLE: "sweep", tracking.TAG_SWEEP_ID: sweep_id})[0]
        log_results(client, run.info.run_id, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
