"""Start MLflow on the AWS head against its RDS PostgreSQL run database (cluster/aws-gpu.yaml).

    python cluster/mlflow_server.py --db-instance unmix-mlflow --artifacts-destination s3://B/mlflow \
        --host 10.0.0.5 --port 5000 [any other `mlflow server` option]

The RDS instance is looked up by its identifier (endpoint, port, database name and the ARN of the
master-user secret that RDS keeps in Secrets Manager); the password is read from that secret and
handed to the server as ``PGPASSWORD`` (libpq reads it), so it appears in no file, no URI and no
process argument list. ``MLFLOW_BACKEND_STORE_URI`` (which ``mlflow server --backend-store-uri``
reads) carries the rest. ``mlflow db upgrade`` runs first: it creates the tables in an empty database
and migrates one made by an older MLflow; then this process becomes ``mlflow server``.

Credentials for the AWS calls come from the instance role (IMDSv2); the region from
``AWS_DEFAULT_REGION``. Needs ``rds:DescribeDBInstances`` and ``secretsmanager:GetSecretValue`` on
the instance's secret (docs/cluster.md, "IAM instance profiles").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any
from urllib.parse import quote


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


def database_credentials(db_instance: str, rds=None, secrets=None) -> tuple[str, str]:
    """(backend URI without password, password) of the RDS instance ``db_instance``."""
    import boto3

    rds = rds or boto3.client("rds")
    secrets = secrets or boto3.client("secretsmanager")
    instance = rds.describe_db_instances(DBInstanceIdentifier=db_instance)["DBInstances"][0]
    secret_arn = (instance.get("MasterUserSecret") or {}).get("SecretArn")
    if not secret_arn:
        raise SystemExit(f"{db_instance}: its master password is not managed in Secrets Manager "
                         "(create or modify it with --manage-master-user-password; docs/cluster.md)")
    secret = json.loads(secrets.get_secret_value(SecretId=secret_arn)["SecretString"])
    return backend_uri(instance, secret["username"]), secret["password"]


def main(argv: list[str] | None = None, rds=None, secrets=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db-instance", required=True, help="RDS DB instance identifier")
    args, server_args = parser.parse_known_args(argv)
    uri, password = database_credentials(args.db_instance, rds, secrets)
    env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=uri, PGPASSWORD=password)
    subprocess.run(["mlflow", "db", "upgrade", uri], env=env, check=True)
    sys.stdout.flush()
    os.execvpe("mlflow", ["mlflow", "server", "--backend-store-uri", uri, *server_args], env)


if __name__ == "__main__":
    main()
