"""Real services on loopback for tests: an S3 API (moto server) and an MLflow tracking server.

Each is a context manager that starts the process, polls until it answers (bounded), and stops it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .conftest import free_port

BIN = Path(sys.executable).parent


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@contextlib.contextmanager
def process(args: list[str], url: str, log: Path, timeout_s: float = 90, env: dict | None = None) -> Iterator[None]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                                start_new_session=True)
    try:
        wait_http(url, timeout_s, proc)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def moto_s3(tmp: Path, bucket: str = "unmix-test") -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 with ``bucket`` created; yields the endpoint URL."""
    import boto3

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with process([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], url, tmp / "moto.log", 60):
        boto3.client("s3", endpoint_url=url, **_creds()).create_bucket(Bucket=bucket)
        yield url


def _creds() -> dict:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, **_creds())
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@contextlib.contextmanager
def mlflow_server(tmp: Path, port: int | None = None) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over SQLite in ``tmp``, artifacts proxied to ``tmp/artifacts``."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    args = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow-server.db'}",
            "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
            "--workers", "1"]
    with process(args, f"{url}/health", tmp / "mlflow.log", timeout_s=120):
        yield url
