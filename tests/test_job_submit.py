"""The cluster path end to end on the local stand-in (Ray head with token auth, MLflow on PostgreSQL,
S3 on loopback): a sweep submitted with `ray job submit`, stopped with `ray job stop`, the head replaced,
the sweep resumed by its id with no config. (A wrong id: tests/test_bad_input.py and the documented
refusal in tests/test_documented_commands.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from unmix_ray.redact import is_secret_like

from .conftest import ROOT
from .mlflow_checks import assert_one_complete_run, epochs_logged, wait_for
from .services import s3_keys
from .test_standin import listening_addresses, port_of

SMALL = ["grid.mixture=[both]", "grid.seed=[0]", "untrained_reference=false", "train.epochs=4",
         "train.batch_size=64", "train.torch_threads=1", "eval.linear_epochs=2", "eval.knn_k=20",
         "tune.max_concurrent_trials=1", "tune.system_metrics_s=0"]
TRIAL = "simclr-fashion_mnist-both-p0.5-s0"


def submit(s, env_vars: dict, args: list[str], wait: bool = True, job_id: str | None = None,
           ) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", s.dashboard_url,
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": env_vars})]
    cmd += ["--submission-id", job_id] if job_id else []
    cmd += ([] if wait else ["--no-wait"]) + ["--", "python", "jobs/sweep.py", *args]
    return subprocess.run(cmd, env=s.env, capture_output=True, text=True, timeout=1500)


def runs(uri: str) -> dict[str, object]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("unmix-ray")
    found = client.search_runs([exp.experiment_id]) if exp else []
    return {r.info.run_name: r for r in found}


@pytest.mark.slow
@pytest.mark.ray
def test_a_submitted_sweep_survives_a_stop_and_a_new_head(tmp_path, small_fashion_mnist):
    from cluster.local_standin import S3_ENV, _alive, _http_status, _pids_mentioning, restart_head, standin

    with standin(tmp_path / "standin") as s:
        for url in (s.dashboard_url, s.mlflow_uri, s.s3_endpoint):  # nothing listens beyond loopback
            assert listening_addresses(port_of(url)) == {"127.0.0.1"}, url
        assert _http_status(s.dashboard_url + "/api/version") == 401  # token auth is on
        assert s.postgres_uri.startswith("postgresql://")
        env_vars = {"MLFLOW_TRACKING_URI": s.mlflow_uri, "AWS_ENDPOINT_URL_S3": s.s3_endpoint, **S3_ENV}
        sets = [*SMALL, f"tune.storage_path=s3://{s.bucket}/checkpoints",
                f"datasets.fashion_mnist.root={small_fashion_mnist}"]
        # Named by us: the CLI's own output may carry terminal colour codes around the generated id.
        job_id = "unmix-stop-and-resume"
        job = submit(s, env_vars, ["--config", "configs/sweeps/demo.yaml"] + [a for x in sets for a in ("--set", x)],
                     wait=False, job_id=job_id)
        assert job.returncode == 0, job.stdout + job.stderr

        # 1. Stopped mid-trial (its epoch 1 checkpointed): the trial's run and the sweep's are KILLED.
        wait_for(lambda: 2 in epochs_logged(s.mlflow_uri, TRIAL), 900, "epoch 2 of the trial")
        stop = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "stop", "--address",
                               s.dashboard_url, job_id], env=s.env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        before = runs(s.mlflow_uri)
        sweep_run = next(r for r in before.values() if r.data.tags.get("unmix.role") == "sweep")
        sweep_id = sweep_run.data.tags["unmix.sweep_id"]
        assert {n: r.info.status for n, r in before.items()} == {TRIAL: "KILLED", sweep_id: "KILLED"}

        # 2. A new head (new Ray, new MLflow server; the same PostgreSQL and S3): every run is still there.
        restart_head(s)
        env_vars["MLFLOW_TRACKING_URI"] = s.mlflow_uri
        assert {n: r.info.status for n, r in runs(s.mlflow_uri).items()} == {
            n: r.info.status for n, r in before.items()}

        # 3. Resumed by its id, without a config, on the new head: the killed trial continues in its run from
        # its last checkpoint (epoch 1 is never trained twice) and the sweep finishes.
        resumed = submit(s, env_vars, ["--resume", sweep_id])
        logs = resumed.stdout + resumed.stderr
        (tmp_path / "resume.log").write_text(logs)
        assert resumed.returncode == 0 and "succeeded" in logs, logs[-4000:]
        assert "| fashion_mnist | simclr | resnet_narrow | both@0.5 |" in logs  # the table, printed by the job
        after = runs(s.mlflow_uri)
        assert {n: r.info.status for n, r in after.items()} == {TRIAL: "FINISHED", sweep_id: "FINISHED"}
        assert after[TRIAL].info.run_id == before[TRIAL].info.run_id  # the same run, continued
        assert_one_complete_run(s.mlflow_uri, TRIAL, 4)

        keys = s3_keys(s.s3_endpoint, s.bucket)
        assert any(k.startswith(f"checkpoints/{sweep_id}--{TRIAL}/epoch=") for k in keys), keys[:20]
        assert any(k.startswith("mlflow/") for k in keys)  # artifacts went through the server to S3
        client = MlflowClient(s.mlflow_uri)
        assert "results/results_table.md" in {a.path for a in client.list_artifacts(after[sweep_id].info.run_id,
                                                                                      "results")}
        for r in after.values():  # no credential-looking value in any param or tag, nor in the job's logs
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
