"""The central results table: baseline against Un-Mix, read back from MLflow, as typed records.

One ``ResultRow`` per (dataset, method, backbone, variant) of a sweep, or of a whole experiment. For
each evaluation metric (``TABLE_METRICS``) a ``Cell``: the mean and standard deviation over seeds and
their number; the difference to the ``none`` (no mixture) row of the same dataset, method and
backbone with a 95% confidence interval (``stats.seed_delta``); the same encoder untrained (the
``untrained`` row's mean); the paper's reported number where one exists
(``configs/paper_results.yaml``); and the protocol that made the number (the runs'
``unmix.protocol.*`` tags). Trials that did not finish (failed, killed, or stopped early by a
scheduler) are counted as stopped and give no numbers. The renderers (``render``) and the pictures
(``plots``) read these records; ``ResultsTable.rows`` flattens them into the CSV's columns.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from mlflow.entities import Run

from unmix_ray.config import CONFIG_DIR
from unmix_ray.evaluation import METRIC_SPECS, PROTOCOL_TAG, metric_protocol
from unmix_ray.orchestration.stats import NO_DELTA, Delta, seed_delta
from unmix_ray.orchestration.tracking import trial_runs

TABLE_METRICS = ("knn_top1", "linear_top1", "linear_paper_top1_last", "linear_paper_top1_best")
CORE_METRICS = ("knn_top1", "linear_top1")  # columns present even when no run has them yet
KEYS = ["dataset", "method", "backbone", "variant"]
GROUP = KEYS[:3]
BASELINE, UNTRAINED = "none", "untrained"
STOPPED = ("FAILED", "KILLED")
VARIANT_ORDER = {UNTRAINED: 0, BASELINE: 1, "mixup": 2, "cutmix": 3, "both": 4}
PAPER_RESULTS = CONFIG_DIR / "paper_results.yaml"


def protocol_column(metric: str) -> str:
    """The CSV column holding the protocol of ``metric``: one per protocol tag (``knn_protocol``, ...)."""
    return f"{METRIC_SPECS[metric].protocol}_protocol"


def variant_key(v: str) -> tuple[int, float, str]:
    kind, _, p = v.partition("@")
    try:
        prob = float(p) if p else -1.0
    except ValueError:
        prob = -1.0
    return (VARIANT_ORDER.get(kind, 5), prob, v)


@dataclass(frozen=True)
class Cell:
    """One metric of one row."""

    mean: float
    std: float  # over seeds (NaN with fewer than two)
    n: int  # seeds with this number
    delta: Delta  # to the baseline row of the same group (NO_DELTA on the baseline and untrained rows)
    untrained: float  # the untrained row's mean
    paper: float  # the paper's number, NaN if none
    paper_protocol: str


@dataclass(frozen=True)
class ResultRow:
    dataset: str
    method: str
    backbone: str
    variant: str
    n: int  # finished trials (seeds)
    stopped: int  # trials that failed or were stopped early, counted but not averaged
    running: int
    cells: dict[str, Cell] = field(default_factory=dict)
    protocols: dict[str, str] = field(default_factory=dict)  # protocol tag key -> text(s) of the finished runs

    @property
    def group(self) -> tuple[str, str, str]:
        return self.dataset, self.method, self.backbone

    def protocol(self, metric: str) -> str:
        return self.protocols.get(METRIC_SPECS[metric].protocol, "")


@dataclass
class ResultsTable:
    sweep_id: str | None  # None: every trial of the experiment
    records: list[ResultRow]
    metrics: list[str]
    complete: bool  # every trial finished with its metrics
    failed: int = 0  # trials that FAILED (not counting those a scheduler stopped early, KILLED)

    def markdown(self) -> str:
        return to_markdown(self)

    @property
    def rows(self) -> pd.DataFrame:
        """Every number as one flat row per record: the columns of ``results_table.csv``."""
        if not self.records:
            return pd.DataFrame(columns=KEYS)
        out = []
        for r in self.records:
            row: dict[str, Any] = {k: getattr(r, k) for k in KEYS + ["n", "stopped", "running"]}
            for m in self.metrics:
                c = r.cells[m]
                row |= {m: c.mean, f"{m}_std": c.std, f"{m}_n": c.n, f"delta_{m}": c.delta.value,
                        f"delta_{m}_ci_low": c.delta.low, f"delta_{m}_ci_high": c.delta.high,
                        f"delta_{m}_test": c.delta.test, f"untrained_{m}": c.untrained, f"paper_{m}": c.paper}
            for col in sorted({protocol_column(m) for m in self.metrics}):
                row[col] = r.protocols.get(col.removesuffix("_protocol"), "")
            row |= {f"paper_{m}_protocol": r.cells[m].paper_protocol for m in self.metrics}
            out.append(row)
        return pd.DataFrame(out)


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

@dataclass(frozen=True)
class _Trial:
    """One trial run as the table sees it."""

    key: tuple[str, str, str, str]
    seed: str
    status: str
    start_time: int
    metrics: dict[str, float]
    protocols: dict[str, str]
    params: dict[str, str]


def _trial(run: Run) -> _Trial:
    tags = run.data.tags
    return _Trial(tuple(str(tags.get(k)) for k in KEYS), str(tags.get("seed")), run.info.status,
                  run.info.start_time or 0, dict(run.data.metrics),
                  {k[len(PROTOCOL_TAG):]: v for k, v in tags.items() if k.startswith(PROTOCOL_TAG)},
                  dict(run.data.params))


def _per_seed(trials: list[_Trial], metric: str) -> dict[str, float]:
    return {t.seed: float(t.metrics[metric]) for t in trials if metric in t.metrics}


def _has_results(t: _Trial) -> bool:
    return "knn_top1" in t.metrics and any(m in t.metrics for m in TABLE_METRICS if m.startswith("linear"))


def build_results(uri: str, experiment: str, sweep_id: str | None,
                  paper_results: Path | str | None = PAPER_RESULTS) -> ResultsTable:
    """The results table of sweep ``sweep_id`` (None: of every trial in ``experiment``)."""
    trials = [_trial(r) for r in trial_runs(uri, experiment, sweep_id)]  # newest first
    if not trials:
        return ResultsTable(sweep_id, [], list(CORE_METRICS), complete=False)
    metrics = [m for m in TABLE_METRICS if m in CORE_METRICS or any(m in t.metrics for t in trials)]
    finished: dict[tuple, _Trial] = {}  # a re-run seed counts with its newest finished run
    for t in sorted((t for t in trials if t.status == "FINISHED"), key=lambda t: t.start_time):
        finished[(*t.key, t.seed)] = t
    groups: dict[tuple, list[_Trial]] = defaultdict(list)
    done: dict[tuple, list[_Trial]] = defaultdict(list)
    for t in trials:
        groups[t.key].append(t)
    for (*key, _), t in finished.items():
        done[tuple(key)].append(t)
    entries = load_paper_results(paper_results)

    records = []
    for key in sorted(groups, key=lambda k: (*k[:3], variant_key(k[3]))):
        group, ok = groups[key], done.get(key, [])
        ok_seeds = {t.seed for t in ok}
        named = dict(zip(KEYS, key))
        base, untrained = done.get((*key[:3], BASELINE), []), done.get((*key[:3], UNTRAINED), [])
        cells = {}
        for m in metrics:
            values = _per_seed(ok, m)
            arr = np.array(list(values.values()), dtype=float)
            delta = NO_DELTA if key[3] in (BASELINE, UNTRAINED) else seed_delta(values, _per_seed(base, m))
            u = [t.metrics[m] for t in untrained if m in t.metrics]
            paper = paper_number(entries, named, group[0].params, m)
            cells[m] = Cell(float(arr.mean()) if len(arr) else math.nan,
                            float(arr.std(ddof=1)) if len(arr) > 1 else math.nan, len(arr), delta,
                            float(np.mean(u)) if u else math.nan, *(paper if paper else (math.nan, "")))
        tag_keys = sorted({METRIC_SPECS[m].protocol for m in TABLE_METRICS})
        protocols = {k: " | ".join(sorted({t.protocols[k] for t in ok if t.protocols.get(k)})) for k in tag_keys}
        records.append(ResultRow(
            *key, n=len(ok_seeds),
            stopped=sum(t.status in STOPPED and t.seed not in ok_seeds for t in group),
            running=sum(t.status not in ("FINISHED", *STOPPED) and t.seed not in ok_seeds for t in group),
            cells=cells, protocols=protocols))
    complete = all(t.status == "FINISHED" and _has_results(t) for t in trials)
    return ResultsTable(sweep_id, records, metrics, complete, failed=sum(t.status == "FAILED" for t in trials))


# ----------------------------------------------------------------------------------------- Markdown

def num(v: Any, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:+.2f}" if signed else f"{v:.2f}"


def trials_cell(r: ResultRow, n: int) -> str:
    out = str(n)
    if r.stopped:
        out += f" (+{r.stopped} stopped)"
    if r.running:
        out += f" (+{r.running} running)"
    return out


def delta_text(d: Delta, no_ci: str = "") -> str:
    """``+1.23 [+0.10, +2.36] paired n=3``; empty where there is no difference to show."""
    if not d.test:
        return ""
    out = num(d.value, True)
    if d.has_ci:
        out += f" [{num(d.low, True)}, {num(d.high, True)}]"
    return out + f" {d.test}" + ("" if d.has_ci else no_ci)


def to_markdown(table: ResultsTable) -> str:
    """One section per metric (rows: dataset x method x backbone x variant), each number followed by the
    reference of its protocol; each distinct protocol is written out once at the end."""
    if not table.records:
        return "(no trial runs)"
    protocols: list[str] = []
    papers: list[str] = []

    def ref(text: str, book: list[str], prefix: str = "") -> str:
        if not text:
            return ""
        if text not in book:
            book.append(text)
        return f"[{prefix}{book.index(text) + 1}]"

    untrained = {r.group: r for r in table.records if r.variant == UNTRAINED}
    out = []
    for m in table.metrics:
        out += ["", f"### {METRIC_SPECS[m].label} (%)", "",
                "| dataset | method | backbone | variant | n | mean ± std | Δ vs none [95% CI] | untrained | paper |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in table.records:
            c = r.cells[m]
            p = ref(metric_protocol(m, r.protocol(m)), protocols)
            mean = num(c.mean)
            cell = ""
            if mean:
                cell = f"{mean} ± {num(c.std)} {p}" if c.n > 1 else f"{mean} {p}"
            d = delta_text(c.delta, no_ci=", no CI")
            # the reference row itself, and its number again beside every variant of its group
            u = num(c.untrained) if r.variant != UNTRAINED else ""
            if u:
                ref_row = untrained.get(r.group)
                u += f" {ref(metric_protocol(m, ref_row.protocol(m) if ref_row else ''), protocols)}"
            paper = num(c.paper)
            if paper:
                paper += f" {ref(c.paper_protocol, papers, 'p')}"
            cells = [r.dataset, r.method, r.backbone, r.variant, trials_cell(r, c.n), cell, d, u, paper]
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
