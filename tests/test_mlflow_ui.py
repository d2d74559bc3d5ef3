"""The MLflow UI in a real browser: a sweep's runs with their lineage (dataset, source, commit),
baseline against Un-Mix on the compare page, and the results table, served by a real ``mlflow server``
and rendered by headless Chromium.

Screenshots are kept under test-artifacts/mlflow-ui/ (printed at the end of the test).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from unmix_ray.orchestration.plots import log_sweep_plots
from unmix_ray.orchestration.render import log_results
from unmix_ray.orchestration.results import build_results

from .conftest import ROOT, missing
from .handmade_runs import log_handmade_sweep
from .services import mlflow_server

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]
SHOTS = ROOT / "test-artifacts" / "mlflow-ui"
TIMEOUT_MS = 90_000  # a cold UI on a busy 2-core machine
ML = "workflowType=machine_learning"  # the UI's "Model training" view (its default is GenAI)


@pytest.fixture(scope="module")
def chromium() -> Path:
    if not CHROMIUM.exists():
        subprocess.run(["bash", str(ROOT / "scripts/get_chromium.sh")], check=False)
    if not CHROMIUM.exists():
        missing(f"{CHROMIUM} is not installed and could not be (scripts/get_chromium.sh needs apt-get as root)")
    return CHROMIUM


@pytest.fixture(scope="module")
def shots() -> Path:
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    return SHOTS


def test_runs_comparison_and_table_are_visible(chromium, shots, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with mlflow_server(tmp_path) as url:
        store = log_handmade_sweep(url)
        client = MlflowClient(url)
        table = build_results(url, store.experiment, store.sweep_id)
        log_results(client, store.parent_run_id, table)
        log_sweep_plots(client, store.parent_run_id, url, store.experiment, store.sweep_id, table=table,
                        per_run=False)
        exp_id = client.get_experiment_by_name(store.experiment).experiment_id
        names = {key: client.get_run(run_id).info.run_name for key, run_id in store.run_ids.items()}
        baseline, unmix = names[("none", 0)], names[("mixup", 0)]
        logged = client.get_run(store.run_ids[("none", 0)])
        dataset = logged.inputs.dataset_inputs[0].dataset
        lineage = {"dataset": dataset.name, "digest": dataset.digest,
                   "commit": logged.data.tags["mlflow.source.git.commit"]}
        assert dataset.name == "fashion_mnist" and len(lineage["commit"]) == 40

        with sync_playwright() as p:
            expect.set_options(timeout=TIMEOUT_MS)
            browser = p.chromium.launch(executable_path=str(chromium), args=LAUNCH_ARGS)
            try:
                page = browser.new_page(viewport={"width": 2200, "height": 1100})
                page.set_default_timeout(TIMEOUT_MS)

                # 1. The sweep's run, expanded: every trial run by name.
                page.goto(f"{url}/#/experiments/{exp_id}/runs?{ML}")
                sweep_row = page.locator("[role=row]", has_text=store.sweep_id)
                expect(sweep_row).to_be_visible()
                close_assistant(page)
                sweep_row.locator("button[data-component-id*=runnamecellrenderer]").click()
                for name in sorted(set(names.values())):
                    expect(page.locator("[role=row]", has_text=name)).to_be_visible()
                # Lineage in the runs table: dataset (name, digest, context), source and the commit
                # (the Version column, shown from the Columns menu).
                page.get_by_role("button", name="Columns", exact=True).click()
                page.get_by_text("Version", exact=True).first.click()
                page.keyboard.press("Escape")
                index = page.locator("[role=row]", has_text=baseline).first.get_attribute("row-index")
                cells = " ".join(page.locator(f"[role=row][row-index='{index}']").all_inner_texts())
                for text in (f"{lineage['dataset']} ({lineage['digest']})", "Pretraining", "jobs/sweep.py",
                             lineage["commit"][:6]):
                    assert text in cells, (text, cells)
                page.screenshot(path=shots / "1-runs.png")

                # 2. Select the baseline and an Un-Mix run of the same seed, press Compare.
                for name in (baseline, unmix):
                    page.locator("[role=row]", has_text=name).locator("input[aria-label*='row selection']").check(
                        force=True)
                page.get_by_role("button", name="Compare").click()
                page.wait_for_url("**/compare-runs?**")
                expect(page.get_by_text("Comparing 2 Runs")).to_be_visible()
                for name in (baseline, unmix):
                    expect(page.get_by_text(name, exact=True).first).to_be_visible()
                for text in ("knn_top1", "linear_top1", "mixture.type", "unmix.protocol.knn", "unmix.protocol.linear"):
                    expect(page.get_by_text(text, exact=True).first).to_be_visible()
                # The metric values, one column per run: knn_top1 80 | 81, knn_top5, linear_top1 85 | 86, ...
                values = page.get_by_role("grid").filter(has_text="99.5").first
                expect(values).to_be_visible()
                assert " ".join(values.inner_text().split()).startswith("80 81 99 99 85 86")
                # For the picture: parameters that differ only, then the differing parameters, the metrics
                # and the tags in view.
                page.get_by_role("button", name="Visualizations").click()
                page.get_by_role("switch", name="Parameters - Show diff only").click()
                page.get_by_role("button", name="Parameters").scroll_into_view_if_needed()
                page.screenshot(path=shots / "2-compare.png")

                # 3. The results table on the sweep's run, and its delta heatmap.
                page = browser.new_page(viewport={"width": 2200, "height": 1100})
                page.set_default_timeout(TIMEOUT_MS)
                run_page = f"{url}/#/experiments/{exp_id}/runs/{store.parent_run_id}/artifacts"
                page.goto(f"{run_page}/results/results_summary.csv?{ML}")
                expect(page.get_by_text("+2.00 [-0.48, +4.48] paired n=3").first).to_be_visible()
                expect(page.get_by_text("84.00 ± 3.00").first).to_be_visible()
                expect(page.get_by_text("0 (+1 stopped)").first).to_be_visible()
                close_assistant(page)
                page.screenshot(path=shots / "3-table.png")

                page = browser.new_page(viewport={"width": 2200, "height": 1100})
                page.set_default_timeout(TIMEOUT_MS)
                page.goto(f"{run_page}/plots/delta_heatmap_knn_top1.png?{ML}")
                image = page.get_by_role("img", name="plots/delta_heatmap_knn_top1.png")
                expect(image).to_be_visible()
                page.wait_for_function("img => img.complete && img.naturalWidth > 300", arg=image.element_handle())
                close_assistant(page)
                page.screenshot(path=shots / "4-heatmap.png")
            finally:
                browser.close()
    print(f"\nMLflow UI screenshots: {shots}")
    assert sorted(p.name for p in shots.iterdir()) == ["1-runs.png", "2-compare.png", "3-table.png", "4-heatmap.png"]


def close_assistant(page) -> None:
    """Close the UI's assistant side panel if it is open (it covers part of the page)."""
    panel = page.get_by_role("button", name="Close")
    if panel.count():
        panel.first.click()
