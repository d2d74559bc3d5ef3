"""The local stand-in of the cluster comes up on loopback, works, and goes away completely."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.local_standin import _alive, _http_status, _pids_mentioning, main, standin


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    out = set()
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                ipv4 = len(addr) == 8
                out.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]) if ipv4 else addr)
    return out


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


def test_down_without_a_standin_says_so(tmp_path, capsys):
    assert main(["down", "--dir", str(tmp_path)]) == 1
    assert "no stand-in recorded" in capsys.readouterr().err


@pytest.mark.slow
def test_standin_up_work_and_down(tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient

    with standin(tmp_path / "standin", num_cpus=1, trial_drivers=2) as s:
        recorded = json.loads((tmp_path / "standin" / "standin.json").read_text())
        assert recorded["dashboard_url"] == s.dashboard_url
        for url in (s.dashboard_url, s.mlflow_uri, s.s3_endpoint):
            assert url.startswith("http://127.0.0.1:")
            assert listening_addresses(port_of(url)) == {"127.0.0.1"}, url

        # MLflow stores runs in SQLite and proxies artifacts into the S3 bucket.
        client = MlflowClient(s.mlflow_uri)
        run = client.create_run(client.create_experiment("standin"))
        client.log_metric(run.info.run_id, "loss", 0.5)
        client.log_text(run.info.run_id, "hello", "notes/hello.txt")
        s3 = boto3.client("s3", endpoint_url=s.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="standin", aws_secret_access_key="standin")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s.bucket, Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys

        # Ray: token auth is on, and a job submitted with the token sees the head's resources.
        assert _http_status(s.dashboard_url + "/api/version") == 401
        code = "import json, ray; ray.init(); print('RES', json.dumps(ray.cluster_resources()))"
        job = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", s.dashboard_url, "--",
             "python", "-c", code], env=s.env, capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        resources = json.loads(next(line for line in job.stdout.splitlines() if line.startswith("RES "))[4:])
        assert resources["trial_driver"] == 2 and resources["CPU"] == 1 and "GPU" not in resources

        pids, temp_dir = dict(s.pids), s.ray_temp_dir
        ports = [port_of(u) for u in (s.dashboard_url, s.mlflow_uri, s.s3_endpoint, s.ray_address)]

    assert not any(_alive(p) for p in pids.values())
    assert not _pids_mentioning(temp_dir), "a Ray process of the stand-in outlived it"
    assert not Path(temp_dir).exists()
    assert not (tmp_path / "standin" / "standin.json").exists()
    for port in ports:
        assert not listening_addresses(port), port
