"""Cluster configs, checked offline: Ray's own validation of the launcher YAML, Kubernetes' schemas for
the KubeRay manifests (kubernetes-validate bundles them), and the invariants the project relies on
(GPU placement by accelerator type, one image holding the lock, nothing installed at boot, datasets
from S3, MLflow on PostgreSQL, no credentials, nothing public, a head sized for its trials).

KubeRay's own CRD schemas (RayCluster, RayJob) ship in no package these machines can install, so the
Ray resources are checked in two parts: every pod template inside them against Kubernetes'
PodTemplateSpec schema, and the KubeRay fields this project uses by the structural checks below."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from unmix_ray.orchestration.throughput import load_throughput
from unmix_ray.redact import is_secret_like, is_secret_name

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws-gpu.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
PAPER = ROOT / "configs" / "sweeps" / "paper.yaml"
DOCS = ROOT / "docs" / "cluster.md"
BASE_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
IMAGE_HOME = "/home/ray/unmix-ray"  # the Dockerfile's WORKDIR: the project inside the image
K8S_VERSION = "1.33"  # Kubernetes (EKS) version the manifests are validated against
PRIVATE_PORTS = {8265, 5000, 6379, 10001, 8076, 52365, 5432}  # dashboard, MLflow, GCS, client, objects, agent, db
# EC2 facts the configs depend on: vCPUs, memory (GiB), GPUs and Ray's accelerator type of the GPU.
INSTANCES = {
    "m6i.2xlarge": (8, 32, 0, None),
    "m6i.4xlarge": (16, 64, 0, None),
    "m6i.8xlarge": (32, 128, 0, None),
    "r6i.2xlarge": (8, 64, 0, None),
    "r6i.4xlarge": (16, 128, 0, None),
    "g5.xlarge": (4, 16, 1, "A10G"),
    "p4d.24xlarge": (96, 1152, 8, "A100"),
    "p5en.48xlarge": (192, 2048, 8, "H200"),
}
ACCELERATOR = "accelerator_type:"
HEAD_MEMORY = re.compile(r"#\s*(\d+) running trials x ([\d.]+) GiB \+ ([\d.]+) GiB services = ([\d.]+) GiB")
INSTALLS = re.compile(r"\b(pip3? install|uv pip|conda install|apt(-get)? install|aws s3 (sync|cp))\b")


def strings(node):
    """Every string (keys included) in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def gib(quantity: str | int) -> float:
    """A Kubernetes memory quantity in GiB."""
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, "G": 1e9 / 2**30, "M": 1e6 / 2**30}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", str(quantity))
    assert m, quantity
    return float(m.group(1)) * (units[m.group(2)] if m.group(2) else 2**-30)


def head_memory_model() -> tuple[int, float, float, float]:
    """(trials, GiB per trial, GiB of services, total GiB) from the one comment in the launcher YAML."""
    found = HEAD_MEMORY.findall(AWS.read_text())
    assert len(found) == 1, "cluster/aws-gpu.yaml must state the head memory figure exactly once"
    trials, per_trial, services, total = found[0]
    return int(trials), float(per_trial), float(services), float(total)


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(AWS.read_text())


@pytest.fixture(scope="module")
def kuberay() -> list[dict]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def paper() -> dict:
    return yaml.safe_load(PAPER.read_text())


def worker_types(aws: dict) -> dict[str, dict]:
    return {n: s for n, s in aws["available_node_types"].items() if n != aws["head_node_type"]}


def all_commands(aws: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    out = [c for k in keys for c in aws.get(k, [])]
    for spec in aws["available_node_types"].values():
        out += [c for k in keys for c in spec.get(k, [])]
    return out


def image_parts(image: str) -> tuple[str, str, str]:
    """(account, region, repository:tag) of an ECR image name."""
    m = re.fullmatch(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/(.+:.+)", image)
    assert m, f"{image} is not an ECR image name"
    return m.group(1), m.group(2), m.group(3)


# ----------------------------------------------------------------------------------------------
# AWS cluster launcher


def test_ray_validates_the_launcher_config(aws):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"


def test_every_command_list_is_ours(aws):
    # prepare_config fills missing lists from Ray's defaults (which pip-install a nightly Ray).
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in aws, key


def test_nothing_is_installed_or_synced_at_boot(aws):
    assert aws["setup_commands"] == aws["head_setup_commands"] == aws["worker_setup_commands"] == []
    for name, spec in aws["available_node_types"].items():
        # A type's own list would replace the global one (the ECR login, the data folder).
        for key in ("initialization_commands", "setup_commands", "worker_setup_commands"):
            assert key not in spec, f"{name}: {key}"
    for command in all_commands(aws):
        assert not INSTALLS.search(command), command


def test_head_has_no_gpus_and_hosts_the_drivers(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert not head["resources"].get("GPU")
    assert head["resources"]["CPU"] == 0  # no task runs on the head: only drivers and services
    assert head["resources"]["trial_driver"] >= 1
    assert not [k for k in head["resources"] if k.startswith(ACCELERATOR)]
    assert INSTANCES[head["node_config"]["InstanceType"]][2] == 0, "the head is not a GPU instance"
    assert "InstanceMarketOptions" not in head["node_config"], "drivers stay on an on-demand head"
    for name, spec in worker_types(aws).items():
        assert "trial_driver" not in spec["resources"], name


def test_head_memory_fits_the_running_trials(aws, kuberay):
    trials, per_trial, services, total = head_memory_model()
    assert total == pytest.approx(trials * per_trial + services)
    head = aws["available_node_types"][aws["head_node_type"]]
    # The trial_driver slots cap how many trials run at once, so they are what the head must hold.
    assert head["resources"]["trial_driver"] == trials
    instance = head["node_config"]["InstanceType"]
    assert instance in INSTANCES, f"add {instance}'s vCPUs and memory to INSTANCES"
    # Room under Ray's memory monitor (it kills workers at 95% of the node's memory).
    assert total <= 0.9 * INSTANCES[instance][1], f"{instance} has {INSTANCES[instance][1]} GiB for {total} GiB"
    for kind, spec in ray_specs(kuberay):
        resources = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert gib(resources["requests"]["memory"]) >= total, kind
        assert start_param_resources(spec["headGroupSpec"]["rayStartParams"]) == {"trial_driver": trials}, kind


def test_gpu_types_advertise_their_accelerator(aws):
    from ray.util.accelerators import accelerators

    known = {v for k, v in vars(accelerators).items() if k.isupper() and isinstance(v, str)}
    workers = worker_types(aws)
    assert {s["node_config"]["InstanceType"] for s in workers.values()} == {"g5.xlarge", "p4d.24xlarge",
                                                                            "p5en.48xlarge"}
    for name, spec in workers.items():
        vcpus, _, gpus, kind = INSTANCES[spec["node_config"]["InstanceType"]]
        resources = spec["resources"]
        assert resources["GPU"] == gpus and 1 <= resources["CPU"] <= vcpus, name
        # Exactly the type Ray detects on that GPU, so requests match what the raylet advertises.
        assert [k for k in resources if k.startswith(ACCELERATOR)] == [ACCELERATOR + kind], name
        assert resources[ACCELERATOR + kind] == 1 and kind in known, name


def test_gpu_worker_types(aws):
    table = load_throughput()
    workers = worker_types(aws)
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
        instance = spec["node_config"]["InstanceType"]
        gpu = table.gpu_for_instance(instance)
        if spec["max_workers"] > 0:
            assert gpu, f"{name}: {instance} unknown to the plan (configs/throughput.yaml)"
        if gpu:
            assert gpu.lower() == INSTANCES[instance][3].lower(), name
    spot = {n for n, s in workers.items() if "InstanceMarketOptions" in s["node_config"]}
    assert spot == {"gpu_1x_spot", "gpu_8x_spot"}
    assert all(workers[n]["node_config"]["InstanceMarketOptions"] == {"MarketType": "spot"} for n in spot)
    assert workers["gpu_8x_h200"]["max_workers"] == 0, "H200 needs reserved capacity: off until reserved"
    assert sum(s["max_workers"] for s in workers.values()) <= aws["max_workers"]
    assert aws["provider"]["cache_stopped_nodes"] is False


def test_every_node_has_a_profile_an_ami_our_security_group_and_imdsv2(aws):
    groups = set()
    for name, spec in aws["available_node_types"].items():
        config = spec["node_config"]
        assert config["IamInstanceProfile"].get("Name"), name
        # Ray's built-in default AMI is an old DLAMI whose driver cannot run torch 2.14's CUDA.
        assert config["ImageId"].startswith("ami-"), name
        assert config["MetadataOptions"]["HttpTokens"] == "required", name
        assert config["MetadataOptions"].get("HttpEndpoint", "enabled") == "enabled", name
        # 2 hops: processes in the container still reach the instance role.
        assert config["MetadataOptions"]["HttpPutResponseHopLimit"] == 2, name
        groups.add(tuple(config["SecurityGroupIds"]))
    assert len(groups) == 1 and all(g.startswith("sg-") for g in groups.pop())
    assert "security_group" not in aws["provider"]


def test_ray_creates_and_opens_no_security_group(aws, monkeypatch):
    # A group Ray creates always gets SSH from anywhere; with SecurityGroupIds on every node type
    # Ray's own bootstrap step leaves groups alone (it would have to call these to change any).
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.util import prepare_config

    def forbidden(*_, **__):
        raise AssertionError("Ray would create or change a security group")

    monkeypatch.setattr(aws_config, "_upsert_security_groups", forbidden)
    monkeypatch.setattr(aws_config, "_upsert_security_group_rules", forbidden)
    prepared = prepare_config(copy.deepcopy(aws))
    assert aws_config._configure_security_group(prepared) == prepared


def test_docs_open_ssh_to_one_address_range_only():
    text = DOCS.read_text()
    for forbidden in ("0.0.0.0/0", "::/0"):
        assert forbidden not in text and forbidden not in AWS.read_text()
    rules = re.findall(r"authorize-security-group-ingress\b(?:[^\n]*\\\n)*[^\n]*", text)
    assert len(rules) >= 2, "the docs create the group's rules"
    cidrs = set(re.findall(r"CidrIp=([^\s,}\]]+)", " ".join(rules)))
    assert cidrs == {"$ADMIN_CIDR"}, cidrs
    ports = re.findall(r"IpProtocol=(\w+),FromPort=(\d+),ToPort=(\d+),IpRanges", " ".join(rules))
    assert ports == [("tcp", "22", "22")], "only SSH from the address range"
    assert any("UserIdGroupPairs=[{GroupId=$SG}]" in r for r in rules), "traffic within the group"


def test_one_image_from_ecr_with_the_token_and_region_in_its_environment(aws, kuberay):
    image = aws["docker"]["image"]
    account, region, name = image_parts(image)
    assert region == aws["provider"]["region"] and name.startswith("unmix-ray:")
    assert "head_image" not in aws["docker"] and "worker_image" not in aws["docker"]
    login = [c for c in aws["initialization_commands"] if "docker login" in c]
    assert len(login) == 1 and f"get-login-password --region {region}" in login[0]
    assert login[0].rstrip().endswith(f"--password-stdin {account}.dkr.ecr.{region}.amazonaws.com")
    options = " ".join(aws["docker"]["run_options"])
    token_path = aws["file_mounts"]
    assert list(token_path) == ["~/.ray/auth_token"]
    assert "-e RAY_AUTH_MODE=token" in options
    assert "-e RAY_AUTH_TOKEN_PATH=/home/ray/.ray/auth_token" in options  # ~ of the image's user
    assert f"-e AWS_DEFAULT_REGION={region}" in options
    images = {c["image"] for doc in kuberay for t in all_pod_specs(doc) for c in containers(t)}
    assert images - {"postgres:16"} == {image}, "one image for both clusters"


def test_image_installs_exactly_the_lock_then_the_project():
    text = DOCKERFILE.read_text()
    assert re.search(rf"^FROM {re.escape(BASE_IMAGE)}$", text, re.M)
    ray_pin = next(d for d in pinned_dependencies() if d.startswith("ray["))
    assert ray_pin.endswith("==" + BASE_IMAGE.split(":")[1].split("-")[0]), "image and pin carry one Ray"
    assert re.search(rf"^WORKDIR {IMAGE_HOME}$", text, re.M)
    installs = re.findall(r"^RUN (.*pip install.*)$", text, re.M)
    assert installs == ["pip install --no-cache-dir --no-deps -r requirements.lock",
                        "pip install --no-cache-dir --no-deps ."]
    assert text.index("COPY --chown=ray:users requirements.lock") < text.index("-r requirements.lock")
    for folder in ("unmix_ray", "configs", "jobs", "cluster"):
        assert f"COPY --chown=ray:users {folder} ./{folder}" in text, folder
    ignore = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:7] == ["!requirements.lock", "!pyproject.toml", "!unmix_ray",
                                                 "!configs", "!jobs", "!cluster", "**/__pycache__"]


def pinned_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_requirements_lock_pins_every_dependency():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = ROOT / "requirements.lock"
    if not lock.is_file():
        pytest.skip("requirements.lock is not in this checkout yet")
    pins = {}
    for line in lock.read_text().replace("\\\n", " ").splitlines():  # pip-compile continues lines for hashes
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            line = " ".join(w for w in line.split() if not w.startswith("--hash"))
            req = Requirement(line.split(";", 1)[0].strip())
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    for dependency in pinned_dependencies():
        req = Requirement(dependency)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} missing from requirements.lock"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} vs {req.specifier}"
    # MLflow's PostgreSQL driver (the AWS head and the Kubernetes MLflow server use postgresql://).
    assert {"psycopg2-binary", "psycopg2"} & set(pins), "requirements.lock has no PostgreSQL driver"


def test_services_listen_privately_and_auth_is_on(aws):
    start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    for cmd in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token ray start" in cmd
            assert "MLFLOW_TRACKING_URI=http://" in cmd
    mlflow = [c for c in aws["head_start_ray_commands"] if "mlflow_server.py" in c]
    assert len(mlflow) == 1
    inner = next(w for w in shlex.split(mlflow[0]) if "mlflow_server.py" in w)  # the script setsid runs
    words = shlex.split(inner.split("exec ", 1)[1])
    assert words[:2] == ["python", f"{IMAGE_HOME}/cluster/mlflow_server.py"]
    assert (ROOT / "cluster" / "mlflow_server.py").is_file()
    assert words[words.index("--db-instance") + 1]
    assert words[words.index("--artifacts-destination") + 1].startswith("s3://")
    assert "--backend-store-uri" not in words, "the database URI comes from RDS and Secrets Manager"
    assert words[words.index("--host") + 1] not in ("0.0.0.0", "::")
    assert "0.0.0.0" not in AWS.read_text()


def test_no_credentials_in_the_launcher_config(aws):
    found = [s for s in strings(aws) if is_secret_like(s)]
    assert not found
    # The registry login pipes a short-lived token from the instance role; no password is written.
    text = AWS.read_text().lower().replace("ecr get-login-password", "").replace("--password-stdin", "")
    for word in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "password", "secret_string"):
        assert word not in text
    # The Ray token travels as a file from the submitting machine, never inline.
    assert aws["file_mounts"] == {"~/.ray/auth_token": "~/.ray/unmix-ray-aws.token"}


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


# ----------------------------------------------------------------------------------------------
# Datasets


SMALL_ARCHIVES = {  # each dataset's original archive, as its loader's LAYOUT names it
    "cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz",
    "stl10": "stl10_binary.tar.gz", "tiny_imagenet": "tiny-imagenet-200.zip",
}


def test_paper_datasets_are_staged_from_s3(paper, aws):
    bucket = paper["tune"]["storage_path"].split("/")[2]
    datasets = paper["datasets"]
    assert set(datasets) == set(paper["grid"]["dataset"])
    data_mount = next(o.split()[1].split(":")[0] for o in aws["docker"]["run_options"] if "/mnt/data" in o)
    for name, entry in datasets.items():
        assert entry["root"] == f"{data_mount}/{name}", name  # the host folder each container writes
        expected = SMALL_ARCHIVES.get(name, f"{name}/")
        assert entry["source"] == f"s3://{bucket}/datasets/{expected}", name
    assert not data_mount.endswith(":ro")


# ----------------------------------------------------------------------------------------------
# KubeRay


def ray_specs(kuberay) -> list[tuple[str, dict]]:
    out = []
    for doc in kuberay:
        if doc["kind"] == "RayCluster":
            out.append(("RayCluster", doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append(("RayJob", doc["spec"]["rayClusterSpec"]))
    return out


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def all_pod_specs(doc: dict) -> list[dict]:
    """The pod specs a manifest makes (Deployment, StatefulSet, the Ray pod templates)."""
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "RayCluster":
        return [t["spec"] for _, t in pod_templates(doc["spec"])]
    if doc["kind"] == "RayJob":
        return [t["spec"] for _, t in pod_templates(doc["spec"]["rayClusterSpec"])]
    return []


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def by_name(kuberay, kind: str, name: str) -> dict:
    return next(d for d in kuberay if d["kind"] == kind and d["metadata"]["name"] == name)


def test_kuberay_manifests_parse(kuberay):
    kinds = {d["kind"] for d in kuberay}
    assert {"RayCluster", "RayJob", "ServiceAccount", "Service", "Deployment", "StatefulSet", "NetworkPolicy",
            "PersistentVolume", "PersistentVolumeClaim"} <= kinds
    assert "Secret" not in kinds and "Ingress" not in kinds
    for doc in kuberay:
        if doc["kind"] in ("Namespace", "PersistentVolume"):  # cluster-scoped
            assert "namespace" not in doc["metadata"]
        else:
            assert doc["metadata"]["namespace"] == "unmix-ray", doc["metadata"]["name"]


def k8s_validate(doc: dict) -> None:
    import kubernetes_validate  # in the dev extra; bundles Kubernetes' schemas (no network)

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def as_pod_template(name: str, template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


def test_kubernetes_objects_match_kubernetes_schemas(kuberay):
    checked = 0
    for doc in kuberay:
        if doc["kind"] not in ("RayCluster", "RayJob"):
            k8s_validate(doc)
            checked += 1
    assert checked >= 10


def test_ray_pod_templates_match_the_pod_template_schema(kuberay):
    for kind, spec in ray_specs(kuberay):
        for name, template in pod_templates(spec):
            k8s_validate(as_pod_template(f"{kind.lower()}-{name}", template))


def test_schema_validation_finds_mistakes(kuberay):
    import kubernetes_validate

    _, spec = ray_specs(kuberay)[0]
    template = copy.deepcopy(spec["workerGroupSpecs"][0]["template"])
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        k8s_validate(as_pod_template("typo", template))
    service = copy.deepcopy(by_name(kuberay, "Service", "unmix-mlflow"))
    service["spec"]["ports"][0]["port"] = "five thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(service)


# The KubeRay (ray.io/v1) fields this project uses; KubeRay's CRD schemas are not installable here.
RAY_CLUSTER_FIELDS = {"rayVersion", "authOptions", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                      "workerGroupSpecs"}
HEAD_GROUP_FIELDS = {"serviceType", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"}
RAY_JOB_FIELDS = {"entrypoint", "runtimeEnvYAML", "submissionMode", "backoffLimit", "shutdownAfterJobFinishes",
                  "ttlSecondsAfterFinished", "rayClusterSpec"}


def start_param_resources(params: dict) -> dict[str, float]:
    """KubeRay puts rayStartParams.resources into the shell command `ray start --resources=<value>`:
    a JSON map, shell-quoted."""
    value = params.get("resources")
    if value is None:
        return {}
    words = shlex.split(value)
    assert len(words) == 1, value
    resources = json.loads(words[0])
    assert all(isinstance(v, (int, float)) for v in resources.values()), value
    return resources


def test_ray_resources_use_only_known_kuberay_fields(kuberay):
    job = next(d for d in kuberay if d["kind"] == "RayJob")
    assert set(job["spec"]) <= RAY_JOB_FIELDS, set(job["spec"]) - RAY_JOB_FIELDS
    assert job["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    for kind, spec in ray_specs(kuberay):
        assert set(spec) <= RAY_CLUSTER_FIELDS, (kind, set(spec) - RAY_CLUSTER_FIELDS)
        assert spec["authOptions"] == {"mode": "token"}, kind
        assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")
        assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS, kind
        names = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert len(set(names)) == len(names), names
        for group in spec["workerGroupSpecs"]:
            assert set(group) <= WORKER_GROUP_FIELDS, (kind, set(group) - WORKER_GROUP_FIELDS)
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", group["groupName"])
            assert all(isinstance(group[k], int) for k in ("replicas", "minReplicas", "maxReplicas"))
        for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in
                                                                    spec["workerGroupSpecs"]]:
            assert all(isinstance(v, str) for v in params.values()), params  # map[string]string
            start_param_resources(params)


def test_rayjob_runs_the_paper_sweep_on_the_raycluster_spec(kuberay, paper):
    from unmix_ray.config.files import apply_overrides

    job = next(d for d in kuberay if d["kind"] == "RayJob")
    cluster = next(d for d in kuberay if d["kind"] == "RayCluster")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml must carry raycluster.yaml's spec"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:6] == ["python", "jobs/sweep.py", "--config", "configs/sweeps/paper.yaml", "--cluster",
                         "cluster/kuberay/raycluster.yaml"]
    for path in (words[1], words[3], words[5]):
        assert (ROOT / path).is_file(), path
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": IMAGE_HOME}
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    assert len(words) == 6 + 2 * len(overrides)
    imagenet = apply_overrides(paper, overrides)["datasets"]["imagenet"]
    assert imagenet["source"] is None  # read in place from the read-only FSx volume
    for _, template in pod_templates(cluster["spec"])[1:]:
        mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
        assert imagenet["root"].startswith(mounts["datasets"]["mountPath"] + "/")
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_kuberay_gpu_groups_and_head(kuberay, aws):
    aws_max = {s["node_config"]["InstanceType"]: s["max_workers"] for s in worker_types(aws).values()
               if "InstanceMarketOptions" not in s["node_config"]}
    aws_head = aws["available_node_types"][aws["head_node_type"]]["node_config"]["InstanceType"]
    for kind, spec in ray_specs(kuberay):
        assert spec["rayVersion"] == "2.60.0", kind
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert set(start_param_resources(head["rayStartParams"])) == {"trial_driver"}
        resources = head["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in resources["limits"] and resources["requests"] == resources["limits"]
        vcpus, memory, _, _ = INSTANCES[aws_head]
        assert float(resources["limits"]["cpu"]) <= 0.95 * vcpus and gib(resources["limits"]["memory"]) <= 0.9 * memory
        instances = set()
        for group in spec["workerGroupSpecs"]:
            name = group["groupName"]
            assert group["minReplicas"] == 0 and 0 <= group["replicas"] <= group["maxReplicas"], name
            instance = group["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
            instances.add(instance)
            vcpus, memory, gpus, accelerator = INSTANCES[instance]
            assert start_param_resources(group["rayStartParams"]) == {ACCELERATOR + accelerator: 1}, name
            container = group["template"]["spec"]["containers"][0]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert requests == limits and int(limits["nvidia.com/gpu"]) == gpus, name
            assert float(limits["cpu"]) <= 0.95 * vcpus and gib(limits["memory"]) <= 0.9 * memory, name
            assert group["maxReplicas"] == aws_max[instance], f"{name}: same scale as cluster/aws-gpu.yaml"
        assert instances == set(aws_max), kind


def test_kuberay_datasets_volume_is_fsx_mounted_read_only(kuberay, paper):
    pv = by_name(kuberay, "PersistentVolume", "unmix-ray-datasets")
    pvc = by_name(kuberay, "PersistentVolumeClaim", "unmix-ray-datasets")
    assert pv["spec"]["csi"]["driver"] == "fsx.csi.aws.com"
    assert pv["spec"]["csi"]["volumeHandle"].startswith("fs-")
    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # FSx CSI: no ROX
    assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"] == ""  # bound statically
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["claimRef"] == {"namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"]}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    staged = {n: d["root"] for n, d in paper["datasets"].items() if d.get("source")}
    for _, spec in ray_specs(kuberay):
        for name, template in pod_templates(spec)[1:]:
            volumes = {v["name"]: v for v in template["spec"]["volumes"]}
            mounts = {m["name"]: m for m in template["spec"]["containers"][0]["volumeMounts"]}
            assert volumes["datasets"]["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"],
                                                                    "readOnly": True}, name
            assert mounts["datasets"]["readOnly"] is True, name
            # The S3-staged datasets land on a writable scratch volume of the pod.
            assert "emptyDir" in volumes["staging"] and not mounts["staging"].get("readOnly"), name
            for root in staged.values():
                assert root.startswith(mounts["staging"]["mountPath"] + "/"), (name, root)


def test_kuberay_mlflow_runs_on_postgres_with_the_password_from_a_secret(kuberay):
    db = by_name(kuberay, "StatefulSet", "unmix-mlflow-db")
    db_service = by_name(kuberay, "Service", "unmix-mlflow-db")
    mlflow = by_name(kuberay, "Deployment", "unmix-mlflow")
    postgres = db["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in postgres["env"]}
    secret = env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    data = db["spec"]["volumeClaimTemplates"][0]
    assert postgres["volumeMounts"][0]["name"] == data["metadata"]["name"]
    assert env["PGDATA"]["value"].startswith(postgres["volumeMounts"][0]["mountPath"] + "/")
    assert db_service["spec"]["selector"] == db["spec"]["selector"]["matchLabels"]
    assert db_service["spec"]["ports"][0]["port"] == 5432
    pod = mlflow["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["mlflow", "db", "upgrade", "$(MLFLOW_BACKEND_STORE_URI)"]
    server = pod["containers"][0]
    assert server["command"][:2] == ["mlflow", "server"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in server["command"]
    assert any(a.startswith("--artifacts-destination=s3://") for a in server["command"])
    user, database = env["POSTGRES_USER"]["value"], env["POSTGRES_DB"]["value"]
    host = f"{db_service['metadata']['name']}.{db_service['metadata']['namespace']}.svc.cluster.local"
    for container in (init, server):
        cenv = {e["name"]: e for e in container["env"]}
        assert cenv["MLFLOW_BACKEND_STORE_URI"]["value"] == f"postgresql://{user}@{host}:5432/{database}"
        assert cenv["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == secret  # libpq reads it; not in the URI
    policy = by_name(kuberay, "NetworkPolicy", "unmix-mlflow-db-clients")
    assert policy["spec"]["podSelector"]["matchLabels"] == db["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": {"matchLabels": mlflow["spec"]["selector"][
        "matchLabels"]}}], "ports": [{"port": 5432, "protocol": "TCP"}]}]


def test_kuberay_pods_use_irsa_and_the_private_mlflow(kuberay):
    service = by_name(kuberay, "Service", "unmix-mlflow")
    policy = by_name(kuberay, "NetworkPolicy", "unmix-mlflow-clients")
    client_label = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    sa = next(d for d in kuberay if d["kind"] == "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for _, spec in ray_specs(kuberay):
        for name, template in pod_templates(spec):
            assert template["spec"]["serviceAccountName"] == sa["metadata"]["name"], name
            assert client_label.items() <= template["metadata"]["labels"].items(), name
            env = {e["name"]: e for e in template["spec"]["containers"][0].get("env", [])}
            assert env["MLFLOW_TRACKING_URI"]["value"].startswith(f"http://{service['metadata']['name']}.")


def test_kuberay_nothing_public(kuberay):
    for doc in kuberay:
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
        for text in strings(doc):
            assert text not in ("LoadBalancer", "NodePort")
        for pod in all_pod_specs(doc):
            assert not pod.get("hostNetwork"), doc["metadata"]["name"]
            for c in containers(pod):
                assert all("hostPort" not in p for p in c.get("ports", [])), doc["metadata"]["name"]


def test_kuberay_no_credentials(kuberay):
    for doc in kuberay:
        assert not [s for s in strings(doc) if is_secret_like(s)], doc["metadata"]["name"]
        for pod in all_pod_specs(doc):
            for c in containers(pod):
                for e in c.get("env", []):
                    if is_secret_name(e["name"]) or re.search(r"PASSWORD|TOKEN|SECRET|KEY", e["name"]):
                        assert "value" not in e, e["name"]  # secrets come from valueFrom only


# ----------------------------------------------------------------------------------------------
# docs/cluster.md


def local_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(marker, commands) of every ```sh local / ```sh local-error block: commands a test can run here."""
    blocks = re.findall(r"^ *```sh (local(?:-error)?)\n(.*?)^ *```$", text, re.M | re.S)
    return [(marker, [c.strip() for c in body.replace("\\\n", " ").splitlines()
                      if c.strip() and not c.strip().startswith("#")]) for marker, body in blocks]


def test_docs_mark_the_commands_that_run_here():
    blocks = local_blocks(DOCS.read_text())
    commands = [c for _, cs in blocks for c in cs]
    assert any("jobs/sweep.py" in c and "--dry-run" in c and "--cluster cluster/aws-gpu.yaml" in c for c in commands)
    assert any("jobs/sweep.py" in c and "--cluster cluster/kuberay/raycluster.yaml" in c for c in commands)
    assert any("tests/test_cluster_config.py" in c for c in commands)
    assert any("local_standin.py up" in c for c in commands) and any("local_standin.py down" in c for c in commands)
    errors = [c for marker, cs in blocks if marker == "local-error" for c in cs]
    assert any("--resume" in c for c in errors)


def test_docs_name_only_files_that_exist():
    text = DOCS.read_text()
    paths = set(re.findall(r"\b((?:cluster|configs|jobs|tests|unmix_ray|docs)/[\w./-]*\w)", text))
    assert "cluster/Dockerfile" in paths and "cluster/kuberay/base.yaml" in paths
    missing = sorted(p for p in paths if not (ROOT / p).exists() and "<" not in p)
    assert not missing, missing
