"""The results table's statistics against hand-made runs in a real MLflow store, with known answers."""

from __future__ import annotations

import json
import math
import re

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from unmix_ray.evaluation import METRIC_SPECS
from unmix_ray.orchestration.render import log_results
from unmix_ray.orchestration.results import (
    PAPER_RESULTS,
    TABLE_METRICS,
    build_results,
    load_paper_results,
    paper_number,
    protocol_column,
)
from unmix_ray.orchestration.stats import seed_delta, t_quantile
from unmix_ray.orchestration.tracking import latest_sweep_id

from .handmade_runs import LINEAR_OFFSET, log_handmade_sweep

T_975_2 = 4.302652729749464  # Student's t, 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)
T_975_4 = 2.7764451051977987  # 4 degrees of freedom (2.776)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    return log_handmade_sweep(uri)


@pytest.fixture(scope="module")
def table(store):
    return build_results(store.uri, store.experiment, store.sweep_id)


def row(table, variant: str) -> dict:
    rows = table.rows[table.rows["variant"] == variant]
    assert len(rows) == 1, f"one row for {variant}"
    return rows.iloc[0].to_dict()


def test_t_quantiles_match_printed_tables():
    assert t_quantile(0.975, 2) == pytest.approx(T_975_2, rel=1e-9)
    assert t_quantile(0.975, 4) == pytest.approx(T_975_4, rel=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, rel=1e-5)


def test_rows_variants_and_trial_counts(table):
    assert not table.complete  # a killed and a failed trial
    assert list(table.rows["variant"]) == ["untrained", "none", "mixup", "cutmix", "both@0.25", "both@0.5"]
    counts = table.rows.set_index("variant")[["n", "stopped", "running"]].to_dict("index")
    assert counts["none"] == {"n": 3, "stopped": 0, "running": 0}
    assert counts["cutmix"] == {"n": 2, "stopped": 1, "running": 0}
    assert counts["both@0.25"] == {"n": 0, "stopped": 1, "running": 0}


def test_mean_std_over_seeds(table):
    none, mixup = row(table, "none"), row(table, "mixup")
    assert none["knn_top1"] == pytest.approx(82.0) and none["knn_top1_std"] == pytest.approx(2.0)
    assert mixup["knn_top1"] == pytest.approx(84.0) and mixup["knn_top1_std"] == pytest.approx(3.0)
    assert mixup["linear_top1"] == pytest.approx(84.0 + LINEAR_OFFSET)


def test_stopped_trials_are_not_results(table):
    cutmix = row(table, "cutmix")
    assert cutmix["knn_top1"] == pytest.approx(84.0)  # (83 + 85) / 2: the killed run's 99 is left out
    assert cutmix["knn_top1_n"] == 2
    failed = row(table, "both@0.25")
    assert math.isnan(failed["knn_top1"]) and failed["delta_knn_top1_test"] == ""


def test_paired_delta_and_confidence_interval(table):
    mixup = row(table, "mixup")  # per-seed differences 1, 2, 3: mean 2, sd 1
    half = T_975_2 * 1.0 / math.sqrt(3)
    assert mixup["delta_knn_top1"] == pytest.approx(2.0)
    assert mixup["delta_knn_top1_ci_low"] == pytest.approx(2.0 - half)
    assert mixup["delta_knn_top1_ci_high"] == pytest.approx(2.0 + half)
    assert mixup["delta_knn_top1_test"] == "paired n=3"
    cutmix = row(table, "cutmix")  # seeds 0 and 1 shared: differences 3 and 3
    assert cutmix["delta_knn_top1"] == pytest.approx(3.0)
    assert cutmix["delta_knn_top1_ci_low"] == pytest.approx(3.0)
    assert cutmix["delta_knn_top1_test"] == "paired n=2"


def test_unpaired_delta_uses_welch(table):
    both = row(table, "both@0.5")  # seeds 3, 4 (85, 87) against 0, 1, 2 (80, 82, 84)
    sv, sb = 2.0 / 2, 4.0 / 3  # variance / n on each side
    df = (sv + sb) ** 2 / (sv**2 / 1 + sb**2 / 2)
    half = t_quantile(0.975, df) * math.sqrt(sv + sb)
    assert df == pytest.approx(2.882353, rel=1e-6)
    assert both["delta_knn_top1"] == pytest.approx(4.0)
    assert both["delta_knn_top1_ci_low"] == pytest.approx(4.0 - half)
    assert both["delta_knn_top1_test"] == "unpaired"


def test_untrained_reference_and_no_delta_on_reference_rows(table):
    assert list(table.rows["untrained_knn_top1"]) == pytest.approx([71.0] * len(table.rows))
    for variant in ("none", "untrained"):
        assert math.isnan(row(table, variant)["delta_knn_top1"])


def test_seed_delta_edge_cases():
    assert seed_delta({"0": 2.0}, {"0": 1.0}).test == "paired n=1"
    assert not seed_delta({"0": 2.0}, {"0": 1.0}).has_ci
    assert math.isnan(seed_delta({}, {"0": 1.0}).value)
    # partly shared seeds: paired over the shared ones only
    d = seed_delta({"0": 5.0, "1": 6.0, "9": 100.0}, {"0": 4.0, "1": 4.0, "2": 0.0})
    assert d.value == pytest.approx(1.5) and d.test == "paired n=2"


def test_the_protocol_is_on_every_number(table):
    rows = table.rows
    for m in table.metrics:
        has_number = rows[m].notna()
        assert (rows.loc[has_number, protocol_column(m)].str.len() > 0).all(), m
    md = table.markdown()
    sections = md.split("### ")[1:]
    assert {s.splitlines()[0] for s in sections} == {f"{METRIC_SPECS[m].label} (%)" for m in table.metrics}
    numbered = 0
    for line in md.splitlines():
        if not line.startswith("| ") or line.startswith("| dataset"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        mean_cell, untrained_cell = cells[5], cells[7]
        for cell in (mean_cell, untrained_cell):
            if re.search(r"\d", cell):
                assert re.search(r"\[\d+\]$", cell), f"number without a protocol reference: {line}"
                numbered += 1
    assert numbered >= 8
    refs = dict(re.findall(r"^\[(\d+)\] (.+)$", md, flags=re.M))
    assert any("weighted kNN k=20" in p for p in refs.values())
    assert any(p.startswith("linear (fast)") for p in refs.values())
    assert "+2.00 [" in md and "paired n=3" in md and "(+1 stopped)" in md


def test_paper_numbers_from_a_results_file(store, tmp_path):
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump({"results": [
        {"dataset": "fashion_mnist", "method": "simclr", "metric": "knn_top1", "baseline": 90.0, "unmix": 92.5,
         "epochs": 100, "unmix_variant": "mixup", "protocol": "made-up reference for the test"}]}))
    table = build_results(store.uri, store.experiment, store.sweep_id, paper_results=path)
    assert row(table, "none")["paper_knn_top1"] == 90.0
    assert row(table, "mixup")["paper_knn_top1"] == 92.5
    assert "(+2.50)" in row(table, "mixup")["paper_knn_top1_protocol"]
    assert math.isnan(row(table, "cutmix")["paper_knn_top1"])  # the authors' number is for mixup here
    assert math.isnan(row(table, "untrained")["paper_knn_top1"])
    assert "[p1] made-up reference for the test" in table.markdown()


def test_the_papers_table_is_complete_and_matched_by_params():
    entries = load_paper_results(PAPER_RESULTS)
    assert len(entries) == 8
    for e in entries:
        assert e["metric"] in TABLE_METRICS and e["protocol"] and e["unmix"] > e["baseline"]
    cifar_sym = {"dataset": "cifar10", "method": "moco_v1", "variant": "none"}
    assert paper_number(entries, cifar_sym, {"method.params.symmetric": "True"}, "knn_top1")[0] == 90.49
    assert paper_number(entries, cifar_sym, {"method.params.symmetric": "False"}, "knn_top1")[0] == 89.11
    imagenet = {"dataset": "imagenet", "method": "moco_v2", "variant": "cutmix"}
    assert paper_number(entries, imagenet, {"train.epochs": "800"}, "linear_paper_top1_last")[0] == 71.8
    assert paper_number(entries, imagenet, {"train.epochs": "200"}, "linear_paper_top1_last")[0] == 68.6
    swav = {"dataset": "cifar100", "method": "swav", "variant": "both@0.5"}
    assert paper_number(entries, swav, {}, "linear_paper_top1_best")[0] == 69.9
    assert paper_number(entries, {**swav, "variant": "mixup"}, {}, "linear_paper_top1_best") is None
    assert paper_number(entries, swav, {}, "linear_paper_top1_last") is None  # a different protocol


def test_log_results_and_a_whole_experiment(store, table):
    other = log_handmade_sweep(store.uri, store.experiment, sweep_id="handmade-20250102-000000")
    everything = build_results(store.uri, store.experiment, None)
    # the same seeds again in a second sweep: each (variant, seed) counts once, its newest run
    assert everything.rows[["variant", "n"]].equals(table.rows[["variant", "n"]])
    client = MlflowClient(store.uri)
    log_results(client, other.parent_run_id, table)
    files = {a.path for a in client.list_artifacts(other.parent_run_id, "results")}
    assert {"results/results_table.json", "results/results_table.csv", "results/results_table.md"} <= files
    csv = pd.read_csv(client.download_artifacts(other.parent_run_id, "results/results_table.csv"))
    assert list(csv["variant"]) == list(table.rows["variant"])
    md = open(client.download_artifacts(other.parent_run_id, "results/results_table.md")).read()
    assert md == table.markdown()
    text = open(client.download_artifacts(other.parent_run_id, "results/results_table.json")).read()
    assert "NaN" not in text  # valid JSON for the UI
    shown = json.loads(text)  # what the UI shows: readable cells, each metric with its protocol column
    columns = shown["columns"]
    mixup = dict(zip(columns, next(r for r in shown["data"] if r[columns.index("variant")] == "mixup")))
    assert mixup["kNN top-1"] == "84.00 ± 3.00" and mixup["trials"] == "3"
    assert mixup["Δ kNN top-1 vs none [95% CI]"] == "+2.00 [-0.48, +4.48] paired n=3"
    assert mixup["kNN top-1: protocol"].startswith("weighted kNN k=20")
    assert mixup["linear (fast) top-1: protocol"].startswith("linear (fast)")
    summary = pd.read_csv(client.download_artifacts(other.parent_run_id, "results/results_summary.csv"))
    assert list(summary.columns) == columns


def load_job(name: str):
    """A job script (jobs/<name>.py) as a module, as `python jobs/<name>.py` would run it."""
    import importlib.util
    import sys

    from .conftest import ROOT

    sys.path.insert(0, str(ROOT / "jobs"))
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_job_prints_saves_and_logs(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    report = load_job("report")
    assert report.main(["--experiment", store.experiment, "--sweep", store.sweep_id, "--out", str(tmp_path),
                        "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"Results of sweep {store.sweep_id}" in out and "| mixup |" in out and "paired n=3" in out
    assert (tmp_path / f"{store.sweep_id}.md").read_text().startswith("### kNN top-1")
    assert latest_sweep_id(store.uri, store.experiment, "demo").startswith("handmade-")  # by sweep name
    assert latest_sweep_id(store.uri, store.experiment, "nope") is None
    client = MlflowClient(store.uri)
    assert "results/results_table.csv" in {a.path for a in client.list_artifacts(store.parent_run_id, "results")}
    assert report.main(["--experiment", store.experiment, "--all", "--out", str(tmp_path), "--no-plots"]) == 0
    assert (tmp_path / "all.csv").is_file()
    exp = client.get_experiment_by_name(store.experiment)
    results = client.search_runs([exp.experiment_id], "tags.`unmix.role` = 'results'")
    assert len(results) == 1 and results[0].info.run_name == f"results-{store.experiment}"
    assert report.main(["--experiment", "no-such-experiment", "--out", str(tmp_path)]) == 2
