"""The central results table: baseline against Un-Mix, read back from MLflow.

One row per (dataset, method, backbone, variant), averaged over seeds; deltas are against the
``none`` (no mixture) row of the same dataset, method and backbone; the ``untrained`` row is the same
encoder at random initialisation. Each number column has a protocol column beside it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from unmix_ray.tracking import TAG_ROLE, TAG_SWEEP, TAG_SWEEP_ID

METRICS = ("knn_top1", "linear_top1")
KEYS = ["dataset", "method", "backbone", "variant"]
VARIANT_ORDER = {"untrained": 0, "none": 1, "mixup": 2, "cutmix": 3}


@dataclass
class ResultsTable:
    sweep_id: str
    rows: pd.DataFrame
    complete: bool  # every trial finished with its metrics

    def markdown(self) -> str:
        return to_markdown(self.rows)


def latest_sweep_id(uri: str, experiment: str, name: str | None = None) -> str | None:
    """The newest sweep id in ``experiment``; ``name`` may be a sweep name or a sweep id."""
    exp = MlflowClient(uri).get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{TAG_ROLE}` = 'sweep'"
    if name:
        query += f" and (tags.`{TAG_SWEEP}` = '{name}' or tags.`{TAG_SWEEP_ID}` = '{name}')"
    runs = MlflowClient(uri).search_runs([exp.experiment_id], query, order_by=["attributes.start_time DESC"],
                                         max_results=1)
    return runs[0].data.tags[TAG_SWEEP_ID] if runs else None


def trial_runs(uri: str, experiment: str, sweep_id: str) -> pd.DataFrame:
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"tags.`{TAG_SWEEP_ID}` = '{sweep_id}' and tags.`{TAG_ROLE}` = 'trial'",
    )


def _variant_key(v: str) -> tuple[int, str]:
    return (VARIANT_ORDER.get(v.split("@")[0], 4), v)


def build_results(uri: str, experiment: str, sweep_id: str) -> ResultsTable:
    runs = trial_runs(uri, experiment, sweep_id)
    if runs.empty:
        return ResultsTable(sweep_id, pd.DataFrame(columns=KEYS), complete=False)
    df = pd.DataFrame({k: runs[f"tags.{k}"] for k in KEYS + ["seed"]})
    df["status"] = runs["status"]
    for m in METRICS:
        df[m] = runs.get(f"metrics.{m}")
    for tag in ("knn", "linear"):
        df[f"{tag}_protocol"] = runs.get(f"tags.unmix.protocol.{tag}")
    finished = df[(df["status"] == "FINISHED") & df[list(METRICS)].notna().all(axis=1)]
    agg = finished.groupby(KEYS, as_index=False).agg(
        n=("seed", "nunique"), knn_top1=("knn_top1", "mean"), linear_top1=("linear_top1", "mean"),
        knn_protocol=("knn_protocol", "first"), linear_protocol=("linear_protocol", "first"))
    base = agg[agg["variant"] == "none"].set_index(KEYS[:3])
    for m in METRICS:
        ref = agg.set_index(KEYS[:3]).index.map(base[m].to_dict().get) if not base.empty else None
        agg[f"delta_{m}"] = agg[m] - pd.to_numeric(pd.Series(ref, index=agg.index), errors="coerce")
        agg.loc[agg["variant"].isin(["none", "untrained"]), f"delta_{m}"] = float("nan")
    agg = agg.sort_values(KEYS[:3] + ["variant"], key=lambda s: s.map(_variant_key) if s.name == "variant" else s)
    cols = KEYS + ["n", "knn_top1", "delta_knn_top1", "linear_top1", "delta_linear_top1",
                   "knn_protocol", "linear_protocol"]
    return ResultsTable(sweep_id, agg[cols].reset_index(drop=True), complete=len(finished) == len(df))


def _fmt(v: object, signed: bool = False) -> str:
    if isinstance(v, float):
        if pd.isna(v):
            return ""
        return f"{v:+.2f}" if signed else f"{v:.2f}"
    return str(v)


def to_markdown(rows: pd.DataFrame) -> str:
    """Numbers table, then each distinct protocol once, referenced by number: readable in a terminal."""
    protocols: list[str] = []

    def ref(p: object) -> str:
        if not isinstance(p, str):
            return ""
        if p not in protocols:
            protocols.append(p)
        return f"[{protocols.index(p) + 1}]"

    header = ["dataset", "method", "backbone", "variant", "n", "kNN top-1", "Δ kNN", "linear top-1", "Δ linear"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows.to_dict("records"):
        cells = [r["dataset"], r["method"], r["backbone"], r["variant"], r["n"],
                 f"{_fmt(r['knn_top1'])} {ref(r['knn_protocol'])}", _fmt(r["delta_knn_top1"], True),
                 f"{_fmt(r['linear_top1'])} {ref(r['linear_protocol'])}", _fmt(r["delta_linear_top1"], True)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = [f"[{i + 1}] {p}" for i, p in enumerate(protocols)]
    footer = ["", "top-1 in %, mean over n seeds; Δ = variant minus the `none` (no mixture) row; "
              "`untrained` = the same encoder at random initialisation.", *notes]
    return "\n".join(lines + footer)


def log_results(client: MlflowClient, run_id: str, table: ResultsTable) -> None:
    """The table on the sweep's run: an MLflow table (shown in the UI), CSV and Markdown."""
    client.log_table(run_id, data=table.rows, artifact_file="results/results_table.json")
    buf = io.StringIO()
    table.rows.to_csv(buf, index=False)
    client.log_text(run_id, buf.getvalue(), "results/results_table.csv")
    client.log_text(run_id, table.markdown(), "results/results_table.md")
