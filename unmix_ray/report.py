"""The central results table: baseline against Un-Mix, read back from MLflow.

One row per (dataset, method, backbone, variant) of a sweep, or of a whole experiment. For each
evaluation metric (``TABLE_METRICS``): the mean and standard deviation over seeds and their number;
the difference to the ``none`` (no mixture) row of the same dataset, method and backbone with a 95%
confidence interval from the t-distribution (paired by seed where the seeds match, Welch's
otherwise); the same encoder untrained (the ``untrained`` row's mean); the paper's reported number
where one exists (``configs/paper_results.yaml``); and the protocol that made the number (from the
runs' ``unmix.protocol.*`` tags). Trials that did not finish (failed, killed, or stopped early by a
scheduler) are counted as stopped and give no numbers.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.tracking import MlflowClient
from scipy import stats

from unmix_ray.config import CONFIG_DIR
from unmix_ray.evaluation import METRIC_SPECS, PROTOCOL_TAG, metric_protocol
from unmix_ray.tracking import TAG_ROLE, TAG_SWEEP, TAG_SWEEP_ID

TABLE_METRICS = ("knn_top1", "linear_top1", "linear_paper_top1_last", "linear_paper_top1_best")
CORE_METRICS = ("knn_top1", "linear_top1")  # columns present even when no run has them yet
KEYS = ["dataset", "method", "backbone", "variant"]
GROUP = KEYS[:3]
BASELINE, UNTRAINED = "none", "untrained"
STOPPED = ("FAILED", "KILLED")
VARIANT_ORDER = {UNTRAINED: 0, BASELINE: 1, "mixup": 2, "cutmix": 3, "both": 4}
PAPER_RESULTS = CONFIG_DIR / "paper_results.yaml"
CONFIDENCE = 0.95


def protocol_column(metric: str) -> str:
    """The column holding the protocol of ``metric``: one per protocol tag (``knn_protocol``, ...)."""
    return f"{METRIC_SPECS[metric].protocol}_protocol"


@dataclass
class ResultsTable:
    sweep_id: str | None  # None: every trial of the experiment
    rows: pd.DataFrame
    complete: bool  # every trial finished with its metrics
    failed: int = 0  # trials that FAILED (not counting those a scheduler stopped early, KILLED)

    def markdown(self) -> str:
        return to_markdown(self.rows)

    @property
    def metrics(self) -> list[str]:
        return [m for m in TABLE_METRICS if m in self.rows.columns]


# ----------------------------------------------------------------------------------------- statistics

def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t-distribution with ``df`` degrees of freedom."""
    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Delta:
    """A difference of means with its confidence interval (NaN where it cannot be estimated)."""

    value: float
    low: float
    high: float
    test: str  # "paired n=K" (K seeds run with both) or "unpaired" (Welch); "" when there is no data

    @property
    def has_ci(self) -> bool:
        return not math.isnan(self.low)


NO_DELTA = Delta(math.nan, math.nan, math.nan, "")


def seed_delta(variant: dict[str, float], baseline: dict[str, float], confidence: float = CONFIDENCE) -> Delta:
    """``variant - baseline`` over seeds. Where seeds are shared, the difference is paired by seed (the
    same seed gives the same initialisation and data order): the mean of the per-seed differences,
    CI = mean +- t(1 - a/2, K-1) * sd / sqrt(K) over the K shared seeds. Without shared seeds, the
    difference of means with Welch's interval. One value per side (or one shared seed): no CI."""
    if not variant or not baseline:
        return NO_DELTA
    q = 1 - (1 - confidence) / 2
    shared = sorted(set(variant) & set(baseline))
    if shared:
        d = np.array([variant[s] - baseline[s] for s in shared])
        k = len(d)
        if k < 2:
            return Delta(float(d[0]), math.nan, math.nan, "paired n=1")
        half = t_quantile(q, k - 1) * d.std(ddof=1) / math.sqrt(k)
        return Delta(float(d.mean()), float(d.mean() - half), float(d.mean() + half), f"paired n={k}")
    v, b = np.array(list(variant.values())), np.array(list(baseline.values()))
    diff = float(v.mean() - b.mean())
    if len(v) < 2 or len(b) < 2:
        return Delta(diff, math.nan, math.nan, "unpaired")
    sv, sb = v.var(ddof=1) / len(v), b.var(ddof=1) / len(b)
    se = math.sqrt(sv + sb)
    if se == 0:
        return Delta(diff, diff, diff, "unpaired")
    df = (sv + sb) ** 2 / (sv**2 / (len(v) - 1) + sb**2 / (len(b) - 1))  # Welch-Satterthwaite
    half = t_quantile(q, df) * se
    return Delta(diff, diff - half, diff + half, "unpaired")


# ----------------------------------------------------------------------------------------- MLflow runs

def latest_sweep_id(uri: str, experiment: str, name: str | None = None) -> str | None:
    """The newest sweep id in ``experiment``; ``name`` may be a sweep name or a sweep id. (MLflow's
    search has no ``or``: the two are searched one after the other.)"""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    query = f"tags.`{TAG_ROLE}` = 'sweep'"
    for extra in ([f" and tags.`{TAG_SWEEP_ID}` = '{name}'", f" and tags.`{TAG_SWEEP}` = '{name}'"] if name else [""]):
        runs = client.search_runs([exp.experiment_id], query + extra, order_by=["attributes.start_time DESC"],
                                  max_results=1)
        if runs:
            return runs[0].data.tags[TAG_SWEEP_ID]
    return None


def trial_runs(uri: str, experiment: str, sweep_id: str | None) -> pd.DataFrame:
    """The trial runs of one sweep (or, with ``sweep_id`` None, of the whole experiment)."""
    mlflow.set_tracking_uri(uri)
    query = f"tags.`{TAG_ROLE}` = 'trial'"
    if sweep_id:
        query += f" and tags.`{TAG_SWEEP_ID}` = '{sweep_id}'"
    if MlflowClient(uri).get_experiment_by_name(experiment) is None:
        return pd.DataFrame()
    return mlflow.search_runs(experiment_names=[experiment], filter_string=query)


def _column(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)


def variant_key(v: str) -> tuple[int, float, str]:
    kind, _, p = v.partition("@")
    try:
        prob = float(p) if p else -1.0
    except ValueError:
        prob = -1.0
    return (VARIANT_ORDER.get(kind, 5), prob, v)


# ----------------------------------------------------------------------------------------- paper numbers

def load_paper_results(path: Path | str | None = PAPER_RESULTS) -> list[dict[str, Any]]:
    if path is None or not Path(path).is_file():
        return []
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get("results", [])


def _param_equal(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool):
        return str(actual).lower() == str(expected).lower()
    return str(actual) == str(expected)


def paper_number(entries: list[dict[str, Any]], row: dict[str, Any], params: dict[str, Any],
                 metric: str) -> tuple[float, str] | None:
    """The paper's number for ``row`` under ``metric`` (baseline on ``none``, Un-Mix on mixture rows)
    and the protocol it came with, or None."""
    variant = row["variant"]
    if variant == UNTRAINED:
        return None
    found = [e for e in entries
             if e.get("dataset") == row["dataset"] and e.get("method") == row["method"] and e.get("metric") == metric
             and all(_param_equal(v, params.get(k)) for k, v in (e.get("match") or {}).items())]
    if variant != BASELINE:
        found = [e for e in found if e.get("unmix_variant") in (None, variant)]
    if not found:
        return None
    try:
        epochs = float(params.get("train.epochs"))
    except (TypeError, ValueError):
        epochs = math.nan
    entry = min(found, key=lambda e: abs(float(e.get("epochs", 0)) - epochs) if not math.isnan(epochs) else 0)
    value = entry["baseline"] if variant == BASELINE else entry["unmix"]
    note = entry.get("protocol", "")
    if variant != BASELINE:
        b, u, mix = entry["baseline"], entry["unmix"], entry.get("unmix_variant") or "not stated"
        note += f"; baseline {b:.2f} -> Un-Mix {u:.2f} ({u - b:+.2f}), mixture {mix}"
    return float(value), note


# ----------------------------------------------------------------------------------------- the table

def build_results(uri: str, experiment: str, sweep_id: str | None,
                  paper_results: Path | str | None = PAPER_RESULTS) -> ResultsTable:
    """The results table of sweep ``sweep_id`` (None: of every trial in ``experiment``)."""
    runs = trial_runs(uri, experiment, sweep_id)
    if runs.empty:
        return ResultsTable(sweep_id, pd.DataFrame(columns=KEYS), complete=False)
    df = pd.DataFrame({k: _column(runs, f"tags.{k}").astype(str) for k in KEYS + ["seed"]})
    df["status"] = runs["status"]
    df["start_time"] = runs["start_time"]
    for m in TABLE_METRICS:
        df[m] = pd.to_numeric(_column(runs, f"metrics.{m}"), errors="coerce")
    tags = sorted({METRIC_SPECS[m].protocol for m in TABLE_METRICS})
    for tag in tags:
        df[f"{tag}_protocol"] = _column(runs, f"tags.{PROTOCOL_TAG}{tag}")
    params = runs[[c for c in runs.columns if c.startswith("params.")]].rename(columns=lambda c: c[len("params."):])
    metrics = [m for m in TABLE_METRICS if m in CORE_METRICS or df[m].notna().any()]

    finished = df[df["status"] == "FINISHED"].sort_values("start_time")
    finished = finished.drop_duplicates(KEYS + ["seed"], keep="last")  # a re-run seed: its newest run
    entries = load_paper_results(paper_results)

    def per_seed(group: pd.DataFrame, metric: str) -> dict[str, float]:
        g = group[group[metric].notna()]
        return dict(zip(g["seed"], g[metric].astype(float)))

    groups = {key: g for key, g in df.groupby(KEYS, sort=False)}
    done = {key: g for key, g in finished.groupby(KEYS, sort=False)}
    rows = []
    for key in sorted(groups, key=lambda k: (*k[:3], variant_key(k[3]))):
        group, ok = groups[key], done.get(key, finished.iloc[0:0])
        row: dict[str, Any] = dict(zip(KEYS, key))
        row["n"] = int(ok["seed"].nunique())
        row["stopped"] = int((group["status"].isin(STOPPED) & ~group["seed"].isin(ok["seed"])).sum())
        row["running"] = int((~group["status"].isin(("FINISHED", *STOPPED)) & ~group["seed"].isin(ok["seed"])).sum())
        base = done.get((*key[:3], BASELINE), finished.iloc[0:0])
        untrained = done.get((*key[:3], UNTRAINED), finished.iloc[0:0])
        run_params = params.loc[group.index[0]].to_dict()
        for m in metrics:
            values = per_seed(ok, m)
            arr = np.array(list(values.values()), dtype=float)
            row[m] = float(arr.mean()) if len(arr) else math.nan
            row[f"{m}_std"] = float(arr.std(ddof=1)) if len(arr) > 1 else math.nan
            row[f"{m}_n"] = len(arr)
            delta = NO_DELTA if key[3] in (BASELINE, UNTRAINED) else seed_delta(values, per_seed(base, m))
            row[f"delta_{m}"], row[f"delta_{m}_ci_low"], row[f"delta_{m}_ci_high"] = delta.value, delta.low, delta.high
            row[f"delta_{m}_test"] = delta.test
            u = untrained[m].dropna()
            row[f"untrained_{m}"] = float(u.mean()) if len(u) else math.nan
            paper = paper_number(entries, row, run_params, m)
            row[f"paper_{m}"], row[f"paper_{m}_protocol"] = paper if paper else (math.nan, "")
        for tag in tags:
            texts = sorted({t for t in ok[f"{tag}_protocol"].dropna() if t})
            row[f"{tag}_protocol"] = " | ".join(texts)
        rows.append(row)
    table = pd.DataFrame(rows)
    order = KEYS + ["n", "stopped", "running"]
    for m in metrics:
        order += [m, f"{m}_std", f"{m}_n", f"delta_{m}", f"delta_{m}_ci_low", f"delta_{m}_ci_high",
                  f"delta_{m}_test", f"untrained_{m}", f"paper_{m}"]
    order += sorted({protocol_column(m) for m in metrics}) + [f"paper_{m}_protocol" for m in metrics]
    has_results = df["knn_top1"].notna() & df[[m for m in TABLE_METRICS if m.startswith("linear")]].notna().any(axis=1)
    complete = bool(((df["status"] == "FINISHED") & has_results).all())
    return ResultsTable(sweep_id, table[order].reset_index(drop=True), complete=complete,
                        failed=int((df["status"] == "FAILED").sum()))


# ----------------------------------------------------------------------------------------- rendering

def _num(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def _trials_cell(r: dict[str, Any], n: int) -> str:
    out = str(n)
    if r.get("stopped"):
        out += f" (+{r['stopped']} stopped)"
    if r.get("running"):
        out += f" (+{r['running']} running)"
    return out


def to_markdown(rows: pd.DataFrame) -> str:
    """One section per metric (rows: dataset x method x backbone x variant), each number followed by the
    reference of its protocol; each distinct protocol is written out once at the end."""
    if rows.empty:
        return "(no trial runs)"
    protocols: list[str] = []
    papers: list[str] = []

    def ref(text: str, book: list[str], prefix: str = "") -> str:
        if not text:
            return ""
        if text not in book:
            book.append(text)
        return f"[{prefix}{book.index(text) + 1}]"

    records = rows.to_dict("records")
    untrained = {tuple(r[k] for k in GROUP): r for r in records if r["variant"] == UNTRAINED}
    out = []
    for m in [m for m in TABLE_METRICS if m in rows.columns]:
        out += ["", f"### {METRIC_SPECS[m].label} (%)", "",
                "| dataset | method | backbone | variant | n | mean ± std | Δ vs none [95% CI] | untrained | paper |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in records:
            p = ref(metric_protocol(m, r.get(protocol_column(m))), protocols)
            mean = _num(r[m])
            cell = ""
            if mean:
                cell = f"{mean} ± {_num(r[f'{m}_std'])} {p}" if r[f"{m}_n"] > 1 else f"{mean} {p}"
            d = ""
            if r[f"delta_{m}_test"]:
                d = _num(r[f"delta_{m}"], True)
                if not math.isnan(r[f"delta_{m}_ci_low"]):
                    d += f" [{_num(r[f'delta_{m}_ci_low'], True)}, {_num(r[f'delta_{m}_ci_high'], True)}]"
                d += f" {r[f'delta_{m}_test']}" + ("" if not math.isnan(r[f"delta_{m}_ci_low"]) else ", no CI")
            # the reference row itself, and its number again beside every variant of its group
            u = _num(r[f"untrained_{m}"]) if r["variant"] != UNTRAINED else ""
            if u:
                ref_row = untrained.get(tuple(r[k] for k in GROUP), {})
                u += f" {ref(metric_protocol(m, ref_row.get(protocol_column(m))), protocols)}"
            paper = _num(r[f"paper_{m}"])
            if paper:
                paper += f" {ref(r[f'paper_{m}_protocol'], papers, 'p')}"
            cells = [r["dataset"], r["method"], r["backbone"], r["variant"], _trials_cell(r, r[f"{m}_n"]),
                     cell, d, u, paper]
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = ["", "Top-1 accuracy in %: mean ± std over n seeds (n: finished trials with the number; stopped: trials "
             "that failed or were stopped early, counted but not averaged). Δ: variant minus the `none` (no mixture) "
             "row of the same dataset, method and backbone, 95% CI from the t-distribution (paired: over the seeds "
             "run with both; unpaired: Welch). untrained: the same encoder at random initialisation, same protocol. "
             "paper: Shen et al. (AAAI 2022), baseline on `none`, Un-Mix on mixture rows, under its own protocol.",
             "", "Protocols:"]
    notes += [f"[{i + 1}] {p}" for i, p in enumerate(protocols)]
    notes += [f"[p{i + 1}] {p}" for i, p in enumerate(papers)]
    return "\n".join(out[1:] + notes)


def json_safe(rows: pd.DataFrame) -> pd.DataFrame:
    """NaN -> None, so the table MLflow stores is valid JSON (the UI cannot parse NaN)."""
    return rows.astype(object).where(rows.notna(), None)


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The table as readable text cells (one column per number kind, and the protocol of each metric
    in its own column): what the MLflow UI shows, where a wide numeric table does not fit."""
    out = []
    for r in rows.to_dict("records"):
        cells = {"dataset / method / backbone": " / ".join(r[k] for k in GROUP), "variant": r["variant"]}
        notes: dict[str, str] = {}  # the protocols, after all the numbers
        cells["trials"] = _trials_cell(r, r["n"])
        for m in [m for m in TABLE_METRICS if m in rows.columns]:
            label = METRIC_SPECS[m].label
            mean = _num(r[m])
            cells[label] = f"{mean} ± {_num(r[f'{m}_std'])}" if mean and r[f"{m}_n"] > 1 else mean
            delta = ""
            if r[f"delta_{m}_test"]:
                delta = _num(r[f"delta_{m}"], True)
                if not math.isnan(r[f"delta_{m}_ci_low"]):
                    delta += f" [{_num(r[f'delta_{m}_ci_low'], True)}, {_num(r[f'delta_{m}_ci_high'], True)}]"
                delta += f" {r[f'delta_{m}_test']}"
            cells[f"Δ {label} vs none [95% CI]"] = delta
            cells[f"{label}: untrained"] = _num(r[f"untrained_{m}"])
            cells[f"{label}: paper"] = _num(r[f"paper_{m}"])
            notes[f"{label}: protocol"] = metric_protocol(m, r.get(protocol_column(m)))
            notes[f"{label}: paper's protocol"] = r[f"paper_{m}_protocol"]
        out.append(cells | notes)
    table = pd.DataFrame(out)
    empty = [c for c in table.columns if (table[c].astype(str) == "").all()]
    return table.drop(columns=empty)


def log_results(client: MlflowClient, run_id: str, table: ResultsTable) -> None:
    """The table on a run (the sweep's, or a results run): the readable summary as an MLflow table
    (``results_table.json``, shown by the UI) and as ``results_summary.csv``; every number as
    ``results_table.csv``; the Markdown as ``results_table.md``."""
    summary = summary_table(table.rows) if not table.rows.empty else table.rows
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


def results_run(client: MlflowClient, experiment_id: str, experiment: str) -> str:
    """The run that holds the table of a whole experiment (tag ``unmix.role=results``): found again,
    or created, so that re-running the report updates one place."""
    found = client.search_runs([experiment_id], f"tags.`{TAG_ROLE}` = 'results'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"results-{experiment}", tags={TAG_ROLE: "results"})
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id
