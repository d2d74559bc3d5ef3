"""Pictures as MLflow artifacts (matplotlib's object API on the Agg canvas: no display, no pyplot state).

- per trial run: ``plots/curves.png``, the loss terms and the kNN monitor over pretraining epochs,
  read back from the run's metric history, with the final evaluation numbers marked;
- per sweep (on the sweep's run): ``plots/delta_heatmap_<metric>.png``, the difference to the baseline
  over (mixture type, P) for each dataset and method, and ``plots/baseline_vs_unmix_<metric>.png``,
  a bar chart of every variant's mean with its spread over seeds.

Each figure says which protocol its numbers come from.
"""

from __future__ import annotations

import math
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient

from unmix_ray.evaluation import METRIC_SPECS, PROTOCOL_TAG, metric_protocol
from unmix_ray.orchestration.results import (
    BASELINE,
    TABLE_METRICS,
    UNTRAINED,
    ResultRow,
    ResultsTable,
    build_results,
    variant_key,
)
from unmix_ray.orchestration.tracking import trial_runs

PLOTS_DIR = "plots"
LOSS_METRICS = ("loss", "loss_clean", "loss_mixed")
MONITOR = "monitor_knn_top1"
MIXTURE_TYPES = ("mixup", "cutmix", "both")


def _caption(fig: Figure, text: str) -> None:
    """Small text under the axes (the protocol), wrapped to the figure's width; constrained layout
    makes room for it."""
    if text:
        width = int(fig.get_figwidth() * 17)  # characters per line at 7 pt
        fig.supxlabel("\n".join(textwrap.wrap(text, width)), fontsize=7, color="0.3", x=0.01, ha="left")


def _log_figure(client: MlflowClient, run_id: str, fig: Figure, name: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        FigureCanvasAgg(fig).print_figure(str(path), dpi=110)
        client.log_artifact(run_id, str(path), PLOTS_DIR)
    return f"{PLOTS_DIR}/{name}"


def log_run_plots(client: MlflowClient, run_id: str) -> str | None:
    """``plots/curves.png`` on one trial run: loss terms and the kNN monitor per epoch (from its metric
    history), final kNN and linear numbers as dashed lines. None if the run logged no history."""
    history = {m: client.get_metric_history(run_id, m) for m in (*LOSS_METRICS, MONITOR)}
    if not any(history.values()):
        return None
    run = client.get_run(run_id)
    fig = Figure(figsize=(11, 4.6), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for m in LOSS_METRICS:
        points = sorted((p.step, p.value) for p in history[m])
        if points:
            ax_loss.plot(*zip(*points), marker="o", ms=3, label=m)
    ax_loss.set(xlabel="pretraining epoch", ylabel="loss", title="training loss (Un-Mix objective terms)")
    ax_loss.legend(fontsize=8)
    points = sorted((p.step, p.value) for p in history[MONITOR])
    if points:
        ax_acc.plot(*zip(*points), marker="o", ms=3, label="kNN monitor (bank: pretraining images)")
    notes = []
    for i, name in enumerate(TABLE_METRICS):
        if name in run.data.metrics:
            value = run.data.metrics[name]
            ax_acc.axhline(value, ls="--", lw=1, color=f"C{i + 1}",
                           label=f"final {METRIC_SPECS[name].label}: {value:.2f}")
            tag = run.data.tags.get(PROTOCOL_TAG + METRIC_SPECS[name].protocol)
            if tag:
                notes.append(f"{name}: {metric_protocol(name, tag)}")
    ax_acc.set(xlabel="pretraining epoch", ylabel="top-1 (%)", title="kNN monitor and final evaluation")
    ax_acc.legend(fontsize=7)
    fig.suptitle(run.info.run_name or run_id)
    _caption(fig, "  ".join(notes))
    return _log_figure(client, run_id, fig, "curves.png")


def _groups(table: ResultsTable) -> list[tuple[tuple[str, str, str], list[ResultRow]]]:
    groups: dict[tuple[str, str, str], list[ResultRow]] = {}
    for r in table.records:
        groups.setdefault(r.group, []).append(r)
    return sorted(groups.items())


def _protocol_text(table: ResultsTable, metric: str) -> str:
    texts = sorted({r.protocol(metric) for r in table.records if r.protocol(metric)})
    return "protocol: " + " | ".join(metric_protocol(metric, t) for t in texts) if texts else ""


def delta_heatmap(table: ResultsTable, metric: str) -> Figure | None:
    """Δ to the baseline over (mixture type, P), one panel per dataset/method/backbone: mixup and cutmix
    alone do not use P (column "-"); ``both`` has one column per P. Cells: Δ and its 95% CI half-width."""
    groups = [(k, g) for k, g in _groups(table) if any(not math.isnan(r.cells[metric].delta.value) for r in g)]
    if not groups:
        return None
    fig = Figure(figsize=(4.8 * len(groups) + 1.5, 4.2), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)
    spread = np.nanmax(np.abs([r.cells[metric].delta.value for r in table.records])) or 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-spread, vmax=spread)
    image = None
    for ax, (key, g) in zip(axes[0], groups):
        probs = sorted({float(r.variant.split("@")[1]) for r in g if r.variant.startswith("both@")})
        cols = ["-"] + [f"{p:g}" for p in probs]
        grid = np.full((len(MIXTURE_TYPES), len(cols)), np.nan)
        labels = [["" for _ in cols] for _ in MIXTURE_TYPES]
        for r in g:
            kind, _, p = r.variant.partition("@")
            if kind not in MIXTURE_TYPES:
                continue
            i, j = MIXTURE_TYPES.index(kind), (cols.index(f"{float(p):g}") if p else 0)
            d = r.cells[metric].delta.value
            if math.isnan(d):
                labels[i][j] = "stopped" if r.stopped else ""
                continue
            grid[i, j] = d
            half = r.cells[metric].delta.high - d
            labels[i][j] = f"{d:+.2f}" + (f"\n±{half:.2f}" if not math.isnan(half) else "")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu", norm=norm, aspect="auto")
        ax.set_facecolor("0.9")
        for i in range(len(MIXTURE_TYPES)):
            for j in range(len(cols)):
                ax.text(j, i, labels[i][j] or ("not run" if math.isnan(grid[i, j]) else ""), ha="center",
                        va="center", fontsize=8)
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(MIXTURE_TYPES)), ["mixup only", "cutmix only", "both (P)"])
        ax.set_xlabel("P (chance a step uses mixup)")
        ax.set_title("/".join(key), fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label=f"Δ {METRIC_SPECS[metric].label} vs none (points)")
    fig.suptitle(f"Un-Mix minus baseline: {METRIC_SPECS[metric].label} (mean over seeds, ± 95% CI half-width)",
                 fontsize=10)
    _caption(fig, _protocol_text(table, metric))
    return fig


def baseline_bars(table: ResultsTable, metric: str) -> Figure | None:
    """Every variant's mean (error bar: std over seeds) per dataset/method/backbone: the untrained
    encoder, the baseline and each Un-Mix variant side by side."""
    groups = [(k, g) for k, g in _groups(table) if any(not math.isnan(r.cells[metric].mean) for r in g)]
    if not groups:
        return None
    widths = [max(3.5, 0.8 * len(g)) for _, g in groups]
    fig = Figure(figsize=(sum(widths) + 1.0, 4.6), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False, width_ratios=widths)
    for ax, (key, g) in zip(axes[0], groups):
        g = sorted(g, key=lambda r: variant_key(r.variant))
        colors = ["0.75" if r.variant == UNTRAINED else "0.45" if r.variant == BASELINE else f"C{i}"
                  for i, r in enumerate(g)]
        means = np.array([r.cells[metric].mean for r in g], dtype=float)
        errs = np.nan_to_num(np.array([r.cells[metric].std for r in g], dtype=float))
        x = np.arange(len(g))
        finite = means[~np.isnan(means)]
        low = max(0.0, finite.min() - 10) if len(finite) else 0.0
        ax.set_ylim(low, min(100.0, (finite + errs[~np.isnan(means)]).max() + 6) if len(finite) else 100.0)
        ax.bar(x, np.nan_to_num(means, nan=low), yerr=errs, color=colors, capsize=3)
        for xi, m, e, n in zip(x, means, errs, [r.cells[metric].n for r in g]):
            if math.isnan(m):
                ax.text(xi, low + 1, "stopped", ha="center", va="bottom", fontsize=7, rotation=90)
            else:
                ax.text(xi, m + e + 0.3, f"{m:.1f}\nn={n}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, [r.variant for r in g], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{METRIC_SPECS[metric].label} (%)")
        ax.set_title("/".join(key), fontsize=9)
    fig.suptitle(f"Baseline (none) vs Un-Mix: {METRIC_SPECS[metric].label}, mean ± std over seeds", fontsize=10)
    _caption(fig, _protocol_text(table, metric))
    return fig


def log_sweep_plots(client: MlflowClient, parent_run_id: str, uri: str, experiment: str, sweep_id: str | None,
                    table: ResultsTable | None = None, per_run: bool = True) -> list[str]:
    """Every picture of a sweep: the curves of each of its trial runs (``per_run``), and on
    ``parent_run_id`` a delta heatmap and a baseline-vs-Un-Mix bar chart per metric of the results
    table (``table``, or built here). Returns the artifact paths logged on the parent run."""
    table = table or build_results(uri, experiment, sweep_id)
    if per_run:
        for run in trial_runs(uri, experiment, sweep_id):
            log_run_plots(client, run.info.run_id)
    logged = []
    if not table.records:
        return logged
    for metric in table.metrics:
        for name, make in (("delta_heatmap", delta_heatmap), ("baseline_vs_unmix", baseline_bars)):
            fig = make(table, metric)
            if fig is not None:
                logged.append(_log_figure(client, parent_run_id, fig, f"{name}_{metric}.png"))
    return logged
