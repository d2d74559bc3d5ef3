"""`ray job submit` of the demo sweep against the local stand-in of the cluster: a Ray head, an MLflow
tracking server with artifacts in S3, and an S3 API (moto), all on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from unmix_ray.redact import is_secret_like

from .conftest import ROOT
from .services import s3_keys
from .test_standin import listening_addresses, port_of

SMALL = ["grid.mixture=[none, cutmix]", "grid.seed=[0]", "train.epochs=2", "train.batch_size=64",
         "train.torch_threads=1",
         "datasets.fashion_mnist.train_subset=512", "datasets.fashion_mnist.test_subset=500",
         "eval.linear_epochs=2", "eval.knn_k=20", "tune.max_concurrent_trials=2"]


@pytest.mark.slow
def test_job_submit_runs_the_demo_sweep_into_the_tracking_server(tmp_path, fashion_mnist_root):
    from cluster.local_standin import S3_ENV, _alive, _http_status, _pids_mentioning, standin

    with standin(tmp_path / "standin") as s:
        for url in (s.dashboard_url, s.mlflow_uri, s.s3_endpoint):  # nothing listens beyond loopback
            assert listening_addresses(port_of(url)) == {"127.0.0.1"}, url
        assert _http_status(s.dashboard_url + "/api/version") == 401  # token auth is on
        env_vars = {"MLFLOW_TRACKING_URI": s.mlflow_uri, "AWS_ENDPOINT_URL_S3": s.s3_endpoint, **S3_ENV}
        sets = SMALL + [f"tune.storage_path=s3://{s.bucket}/checkpoints"]
        cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", s.dashboard_url,
               "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
               "python", "jobs/sweep.py", "--config", "configs/sweeps/demo.yaml"]
        for item in sets:
            cmd += ["--set", item]
        job = subprocess.run(cmd, env=s.env, capture_output=True, text=True, timeout=1500)
        logs = job.stdout + job.stderr
        (tmp_path / "job.log").write_text(logs)
        assert job.returncode == 0, logs[-4000:]
        assert "succeeded" in logs
        assert "| fashion_mnist | simclr | resnet_narrow | cutmix |" in logs  # the table, printed by the job

        client = MlflowClient(s.mlflow_uri)
        exp = client.get_experiment_by_name("unmix-ray")
        runs = client.search_runs([exp.experiment_id])
        trials = [r for r in runs if r.data.tags.get("unmix.role") == "trial"]
        (sweep_run,) = [r for r in runs if r.data.tags.get("unmix.role") == "sweep"]
        assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
        assert sweep_run.info.status == "FINISHED"
        results = {a.path for a in client.list_artifacts(sweep_run.info.run_id, "results")}
        assert "results/results_table.md" in results
        table = client.download_artifacts(sweep_run.info.run_id, "results/results_table.md", str(tmp_path))
        assert "cutmix" in Path(table).read_text()

        keys = s3_keys(s.s3_endpoint, s.bucket)
        assert any(k.startswith("checkpoints/") and "epoch=0002" in k for k in keys), keys[:20]
        assert any(k.startswith("mlflow/") for k in keys)  # artifacts went through the server to S3
        for r in trials:  # the untrained reference keeps its initial weights too
            assert r.data.tags["unmix.checkpoint"].startswith(f"s3://{s.bucket}/checkpoints/")

        # No credential-looking value in any param, tag or the job's logs.
        for r in runs:
            for key, value in {**r.data.params, **r.data.tags}.items():
                assert not is_secret_like(value), (key, value)
        assert not [line for line in logs.splitlines() if is_secret_like(line)]
        pids, temp_dir = dict(s.pids), s.ray_temp_dir
        ports = [port_of(u) for u in (s.dashboard_url, s.mlflow_uri, s.s3_endpoint, s.ray_address)]

    # ... and the stand-in goes away completely.
    assert not any(_alive(p) for p in pids.values())
    assert not _pids_mentioning(temp_dir), "a Ray process of the stand-in outlived it"
    for port in ports:
        assert not listening_addresses(port), port
