"""cluster/mlflow_server.py: MLflow on the AWS head gets its database login from RDS and Secrets Manager,
keeps the password out of URIs and argument lists, upgrades the schema first, and follows rotations."""

from __future__ import annotations

import json

import pytest


class FakeRDS:
    def __init__(self, instance: dict):
        self.instance = instance

    def describe_db_instances(self, DBInstanceIdentifier: str) -> dict:  # noqa: N803 (boto3's name)
        assert DBInstanceIdentifier == self.instance["DBInstanceIdentifier"]
        return {"DBInstances": [self.instance]}


class FakeSecrets:
    """Secrets Manager whose secret is rotated after ``rotate_after`` reads (never if None)."""

    def __init__(self, arn: str, rotate_after: int | None = None):
        self.arn, self.rotate_after, self.reads = arn, rotate_after, 0

    def get_secret_value(self, SecretId: str) -> dict:  # noqa: N803
        assert SecretId == self.arn
        self.reads += 1
        version = 2 if self.rotate_after is not None and self.reads > self.rotate_after else 1
        return {"VersionId": f"v{version}", "SecretString": json.dumps({"username": "mlflow",
                                                                       "password": f"p@ss/w:rd{version}"})}


class FakeServer:
    """An `mlflow server` process that exits with ``status`` after ``lifetime`` polls (never if None)."""

    def __init__(self, calls: list, argv: list[str], env: dict, lifetime: int | None, status: int):
        calls.append(("server", argv, env))
        self.calls, self.lifetime, self.status, self.polls = calls, lifetime, status, 0
        self.returncode = None

    def poll(self):
        self.polls += 1
        if self.lifetime is not None and self.polls > self.lifetime:
            self.returncode = self.status
        return self.returncode

    def terminate(self):
        self.calls.append(("terminate", None, None))
        self.lifetime = self.polls

    def wait(self):
        self.returncode = -15


RDS_INSTANCE = {
    "DBInstanceIdentifier": "unmix-mlflow", "Engine": "postgres", "DBName": "mlflow",
    "Endpoint": {"Address": "unmix-mlflow.abc123.us-west-2.rds.amazonaws.com", "Port": 5432},
    "MasterUserSecret": {"SecretArn": "arn:aws:secretsmanager:us-west-2:111122223333:secret:rds!db-1"},
}
DB_URI = "postgresql://mlflow@unmix-mlflow.abc123.us-west-2.rds.amazonaws.com:5432/mlflow?sslmode=require"


def run_mlflow_server(rotate_after: int | None, lifetimes: list[int | None]) -> tuple[int, list]:
    from cluster import mlflow_server

    calls: list = []
    servers = iter(lifetimes)
    status = mlflow_server.serve(
        "unmix-mlflow", ["--artifacts-destination", "s3://b/mlflow", "--host", "10.0.0.5"], FakeRDS(RDS_INSTANCE),
        FakeSecrets(RDS_INSTANCE["MasterUserSecret"]["SecretArn"], rotate_after), check_every_s=600,
        popen=lambda argv, env: FakeServer(calls, argv, env, next(servers), status=3),
        run=lambda argv, env, check: calls.append(("run", argv, env)), sleep=lambda s: None)
    return status, calls


def test_mlflow_server_reads_the_database_password_from_secrets_manager():
    status, calls = run_mlflow_server(rotate_after=None, lifetimes=[5])
    assert status == 3  # the server's own exit status
    assert [c[0] for c in calls] == ["run", "server"]  # the schema is upgraded before the server starts
    assert calls[0][1] == ["mlflow", "db", "upgrade", DB_URI]
    assert calls[1][1] == ["mlflow", "server", "--backend-store-uri", DB_URI, "--artifacts-destination",
                           "s3://b/mlflow", "--host", "10.0.0.5"]
    for _, argv, env in calls:
        assert env["PGPASSWORD"] == "p@ss/w:rd1" and env["MLFLOW_BACKEND_STORE_URI"] == DB_URI
        assert not any("p@ss" in a for a in argv)


def test_mlflow_server_restarts_with_a_rotated_password():
    # Read 1 starts the server; polls read the secret again; the 4th read sees the new version.
    status, calls = run_mlflow_server(rotate_after=3, lifetimes=[None, 2])
    assert [c[0] for c in calls] == ["run", "server", "terminate", "run", "server"]
    assert calls[1][2]["PGPASSWORD"] == "p@ss/w:rd1" and calls[4][2]["PGPASSWORD"] == "p@ss/w:rd2"
    assert status == 3


def test_mlflow_server_refuses_an_unmanaged_or_foreign_database():
    from cluster import mlflow_server

    unmanaged = {k: v for k, v in RDS_INSTANCE.items() if k != "MasterUserSecret"}
    with pytest.raises(SystemExit, match="manage-master-user-password"):
        mlflow_server.find_database("unmix-mlflow", FakeRDS(unmanaged), FakeSecrets("none"))
    with pytest.raises(SystemExit, match="expected postgres"):
        mlflow_server.backend_uri(RDS_INSTANCE | {"Engine": "mysql"}, "mlflow")
