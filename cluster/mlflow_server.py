"""Run MLflow on the AWS head against its RDS PostgreSQL run database (cluster/aws-gpu.yaml).

    python cluster/mlflow_server.py --db-instance unmix-mlflow --artifacts-destination s3://B/mlflow \
        --host 10.0.0.5 --port 5000 [any other `mlflow server` option]

The RDS instance is looked up by its identifier (endpoint, port, database name and the ARN of the
master-user secret that RDS keeps in Secrets Manager); the password is read from that secret and
handed to the server as ``PGPASSWORD`` (libpq reads it), so it appears in no file, no URI and no
process argument list. ``MLFLOW_BACKEND_STORE_URI`` (which ``mlflow server --backend-store-uri``
reads) carries the rest. ``mlflow db upgrade`` runs first: it creates the tables in an empty database
and migrates one made by an older MLflow; then ``mlflow server`` starts.

RDS rotates that password (every 7 days by default) and a running server keeps the one it started
with, so the secret's current version is checked every ``--check-every`` seconds and the server is
restarted with the new password when it changes (clients retry over the few seconds it takes).
If the server exits on its own, so does this process, with its exit status.

Credentials for the AWS calls come from the instance role (IMDSv2); the region from
``AWS_DEFAULT_REGION``. Needs ``rds:DescribeDBInstances`` and ``secretsmanager:GetSecretValue`` on
the instance's secret (docs/cluster.md, "IAM instance profiles").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote


@dataclass(frozen=True)
class Database:
    uri: str  # without the password
    password: str
    secret_arn: str
    secret_version: str


def backend_uri(instance: dict[str, Any], username: str) -> str:
    """The SQLAlchemy URI of an RDS PostgreSQL instance (a ``describe_db_instances`` entry), without a
    password; TLS required (RDS PostgreSQL accepts it by default)."""
    if instance.get("Engine") != "postgres":
        raise SystemExit(f"{instance.get('DBInstanceIdentifier')}: engine {instance.get('Engine')!r}, "
                         "expected postgres")
    endpoint = instance["Endpoint"]
    database = instance.get("DBName") or "postgres"
    return (f"postgresql://{quote(username, safe='')}@{endpoint['Address']}:{endpoint['Port']}/"
            f"{quote(database, safe='')}?sslmode=require")


def find_database(db_instance: str, rds, secrets) -> Database:
    instance = rds.describe_db_instances(DBInstanceIdentifier=db_instance)["DBInstances"][0]
    secret_arn = (instance.get("MasterUserSecret") or {}).get("SecretArn")
    if not secret_arn:
        raise SystemExit(f"{db_instance}: its master password is not managed in Secrets Manager "
                         "(create or modify it with --manage-master-user-password; docs/cluster.md)")
    secret = secrets.get_secret_value(SecretId=secret_arn)
    value = json.loads(secret["SecretString"])
    return Database(backend_uri(instance, value["username"]), value["password"], secret_arn, secret["VersionId"])


def serve(db_instance: str, server_args: list[str], rds, secrets, check_every_s: float = 600.0,
          popen=subprocess.Popen, run=subprocess.run, sleep=time.sleep) -> int:
    """Upgrade the schema and run the server, restarting it whenever the password changes; returns the
    server's exit status once it exits on its own."""
    while True:
        db = find_database(db_instance, rds, secrets)
        env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=db.uri, PGPASSWORD=db.password)
        run(["mlflow", "db", "upgrade", db.uri], env=env, check=True)
        server = popen(["mlflow", "server", "--backend-store-uri", db.uri, *server_args], env=env)
        while server.poll() is None:
            sleep(check_every_s)
            if secrets.get_secret_value(SecretId=db.secret_arn)["VersionId"] != db.secret_version:
                print("the database password was rotated: restarting the MLflow server", flush=True)
                server.terminate()
                server.wait()
                break
        else:
            return server.returncode


def main(argv: list[str] | None = None) -> None:
    import boto3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # the rest goes to `mlflow server` untouched
    parser.add_argument("--db-instance", required=True, help="RDS DB instance identifier")
    parser.add_argument("--check-every", type=float, default=600.0, metavar="SECONDS",
                        help="how often to look for a rotated password")
    args, server_args = parser.parse_known_args(argv)
    raise SystemExit(serve(args.db_instance, server_args, boto3.client("rds"), boto3.client("secretsmanager"),
                           args.check_every))


if __name__ == "__main__":
    main()
