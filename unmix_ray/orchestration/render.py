"""The results table for MLflow and disk: a readable summary (the table the MLflow UI shows), CSV and
Markdown copies, and logging all of them on a run."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from unmix_ray.evaluation import METRIC_SPECS, metric_protocol
from unmix_ray.orchestration.results import ResultsTable, delta_text, num, trials_cell


def json_safe(rows: pd.DataFrame) -> pd.DataFrame:
    """NaN -> None, so the table MLflow stores is valid JSON (the UI cannot parse NaN)."""
    return rows.astype(object).where(rows.notna(), None)


def summary_table(table: ResultsTable) -> pd.DataFrame:
    """The table as readable text cells (one column per number kind, and the protocol of each metric
    in its own column): what the MLflow UI shows, where a wide numeric table does not fit."""
    out = []
    for r in table.records:
        cells = {"dataset / method / backbone": " / ".join(r.group), "variant": r.variant}
        notes: dict[str, str] = {}  # the protocols, after all the numbers
        cells["trials"] = trials_cell(r, r.n)
        for m in table.metrics:
            c, label = r.cells[m], METRIC_SPECS[m].label
            mean = num(c.mean)
            cells[label] = f"{mean} ± {num(c.std)}" if mean and c.n > 1 else mean
            cells[f"Δ {label} vs none [95% CI]"] = delta_text(c.delta)
            cells[f"{label}: untrained"] = num(c.untrained)
            cells[f"{label}: paper"] = num(c.paper)
            notes[f"{label}: protocol"] = metric_protocol(m, r.protocol(m))
            notes[f"{label}: paper's protocol"] = c.paper_protocol
        out.append(cells | notes)
    table = pd.DataFrame(out)
    empty = [c for c in table.columns if (table[c].astype(str) == "").all()]
    return table.drop(columns=empty)


def log_results(client: MlflowClient, run_id: str, table: ResultsTable) -> None:
    """The table on a run (the sweep's, or a results run): the readable summary as an MLflow table
    (``results_table.json``, shown by the UI) and as ``results_summary.csv``; every number as
    ``results_table.csv``; the Markdown as ``results_table.md``."""
    summary = summary_table(table) if table.records else table.rows
    client.log_table(run_id, data=json_safe(summary), artifact_file="results/results_table.json")
    for name, frame in (("results_table.csv", table.rows), ("results_summary.csv", summary)):
        buf = io.StringIO()
        frame.to_csv(buf, index=False)
        client.log_text(run_id, buf.getvalue(), f"results/{name}")
    client.log_text(run_id, table.markdown(), "results/results_table.md")


def save_results(table: ResultsTable, out_dir: str | Path, name: str | None = None) -> tuple[Path, Path]:
    """The table as ``<name>.md`` and ``<name>.csv`` under ``out_dir`` (name: the sweep id or "all")."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = name or table.sweep_id or "all"
    md, csv = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(table.markdown() + "\n")
    table.rows.to_csv(csv, index=False)
    return md, csv
