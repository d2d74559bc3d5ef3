"""Pictures of a sweep and its runs, logged as MLflow artifacts."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from unmix_ray.orchestration.plots import log_sweep_plots

from .handmade_runs import log_handmade_sweep

PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_and_run_plots_are_logged(tmp_path):
    store = log_handmade_sweep(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(store.uri)
    logged = log_sweep_plots(client, store.parent_run_id, store.uri, store.experiment, store.sweep_id)
    assert sorted(logged) == sorted(f"plots/{kind}_{metric}.png" for kind in ("delta_heatmap", "baseline_vs_unmix")
                                    for metric in ("knn_top1", "linear_top1"))
    on_parent = {a.path for a in client.list_artifacts(store.parent_run_id, "plots")}
    assert set(logged) == on_parent
    for path in logged:
        local = client.download_artifacts(store.parent_run_id, path, str(tmp_path))
        assert open(local, "rb").read(8) == PNG
    for (variant, seed), run_id in store.run_ids.items():
        files = {a.path for a in client.list_artifacts(run_id, "plots")}
        # the untrained encoder has no training history; every other run (stopped ones too) has curves
        assert files == (set() if variant == "untrained" else {"plots/curves.png"}), (variant, seed)
