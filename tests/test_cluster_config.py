"""Cluster configs: Ray's own offline validation of the launcher YAML, and the invariants the
project relies on (GPU placement, pinned dependencies, no credentials, nothing public)."""

from __future__ import annotations

import copy
import ipaddress
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
IMAGE = "rayproject/ray:2.60.0-py311-gpu"
SWEEP_CMD = "python jobs/sweep.py --config configs/sweeps/paper.yaml"
PRIVATE_PORTS = {8265, 5000, 6379, 10001, 8076, 52365}  # dashboard, MLflow, GCS, client, objects, agent


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


def pinned_dependencies() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(AWS.read_text())


@pytest.fixture(scope="module")
def kuberay() -> list[dict]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


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


def test_head_has_no_gpus_and_hosts_the_drivers(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert not head["resources"].get("GPU")
    assert head["resources"]["CPU"] == 0  # no task runs on the head: only drivers and services
    assert head["resources"]["trial_driver"] >= 1
    assert head["node_config"]["InstanceType"].split(".")[0][0] not in "gp"  # not a GPU family
    assert "InstanceMarketOptions" not in head["node_config"], "drivers stay on an on-demand head"
    for name, spec in types.items():
        if name != aws["head_node_type"]:
            assert "trial_driver" not in spec["resources"], name


def test_gpu_worker_types(aws):
    table = load_throughput()
    workers = {n: s for n, s in aws["available_node_types"].items() if n != aws["head_node_type"]}
    instances = {s["node_config"]["InstanceType"] for s in workers.values()}
    assert {"g5.xlarge", "p4d.24xlarge"} <= instances
    for name, spec in workers.items():
        assert spec["resources"].get("GPU", 0) >= 1, name
        assert spec["resources"].get("CPU", 0) >= 1, name
        assert table.gpu_for_instance(spec["node_config"]["InstanceType"]), f"{name}: GPU unknown to the plan"
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
    spot = {n for n, s in workers.items() if "InstanceMarketOptions" in s["node_config"]}
    assert spot == {"gpu_1x_spot", "gpu_8x_spot"}
    assert sum(s["max_workers"] for s in workers.values()) <= aws["max_workers"]
    assert aws["provider"]["cache_stopped_nodes"] is False


def test_every_node_has_an_instance_profile_and_an_explicit_ami(aws):
    for name, spec in aws["available_node_types"].items():
        assert spec["node_config"]["IamInstanceProfile"].get("Name"), name
        # Ray's built-in default AMI is an old DLAMI whose driver cannot run torch 2.14's CUDA.
        assert spec["node_config"]["ImageId"].startswith("ami-"), name


def test_docker_image(aws):
    assert aws["docker"]["image"] == IMAGE
    assert "head_image" not in aws["docker"] and "worker_image" not in aws["docker"]


def test_setup_installs_exactly_the_pinned_dependencies(aws):
    installs = [c for c in aws["setup_commands"] if "pip install" in c]
    assert len(installs) == 1
    words = shlex.split(installs[0])
    requirements = {w for w in words[words.index("install") + 1:] if not w.startswith("-")}
    assert requirements == pinned_dependencies()
    for spec in aws["available_node_types"].values():
        assert "worker_setup_commands" not in spec  # would replace setup_commands on that type


def test_services_listen_privately_and_auth_is_on(aws):
    start = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    for cmd in aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token ray start" in cmd
            assert "MLFLOW_TRACKING_URI=http://" in cmd
    mlflow = next(c for c in aws["head_start_ray_commands"] if "mlflow server" in c)
    inner = next(w for w in shlex.split(mlflow) if "mlflow server" in w)  # the script setsid runs
    words = shlex.split(inner.split("exec ", 1)[1])
    assert any(w.startswith("s3://") for w in words[words.index("--artifacts-destination") + 1:][:1])
    assert words[words.index("--backend-store-uri") + 1].startswith(("sqlite:////", "postgresql://"))
    assert words[words.index("--host") + 1] not in ("0.0.0.0", "::")
    assert "0.0.0.0" not in AWS.read_text().replace("0.0.0.0/0", "")


def test_security_group_opens_only_ssh_to_the_world(aws):
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    ours = aws["provider"].get("security_group", {}).get("IpPermissions", [])
    effective = _create_default_inbound_rules(["sg-cluster"], ours)  # what Ray will authorize
    for rule in effective:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
        cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        if any(ipaddress.ip_network(c).prefixlen == 0 for c in cidrs):  # 0.0.0.0/0 or ::/0
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
    for rule in ours:
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        assert not ports & PRIVATE_PORTS or not (rule.get("IpRanges") or rule.get("Ipv6Ranges")), rule


def test_no_credentials_in_the_launcher_config(aws):
    found = [s for s in strings(aws) if is_secret_like(s)]
    assert not found
    text = AWS.read_text().lower()
    for word in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "password"):
        assert word not in text
    # The Ray token travels as a file from the submitting machine, never inline.
    assert aws["file_mounts"] == {"~/.ray/auth_token": "~/.ray/unmix-ray-aws.token"}


# ----------------------------------------------------------------------------------------------
# KubeRay


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    out = [("head", spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
    return out


def test_kuberay_manifests_parse(kuberay):
    kinds = {d["kind"] for d in kuberay}
    assert {"RayCluster", "RayJob", "ServiceAccount", "Service", "Deployment", "NetworkPolicy"} <= kinds
    assert "Secret" not in kinds and "Ingress" not in kinds
    for doc in kuberay:
        assert doc["metadata"].get("namespace", "unmix-ray") == "unmix-ray" or doc["kind"] == "Namespace"


def ray_specs(kuberay) -> list[tuple[str, dict]]:
    out = []
    for doc in kuberay:
        if doc["kind"] == "RayCluster":
            out.append(("RayCluster", doc["spec"]))
        elif doc["kind"] == "RayJob":
            out.append(("RayJob", doc["spec"]["rayClusterSpec"]))
    return out


def test_rayjob_runs_the_paper_sweep_on_the_raycluster_spec(kuberay):
    job = next(d for d in kuberay if d["kind"] == "RayJob")
    cluster = next(d for d in kuberay if d["kind"] == "RayCluster")
    assert job["spec"]["entrypoint"] == SWEEP_CMD
    assert (ROOT / "configs" / "sweeps" / "paper.yaml").is_file()
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "rayjob.yaml must carry raycluster.yaml's spec"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_kuberay_gpu_groups_and_head(kuberay):
    for kind, spec in ray_specs(kuberay):
        assert spec["rayVersion"] == "2.60.0", kind
        assert spec["authOptions"]["mode"] == "token", kind
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert head["rayStartParams"]["num-cpus"] == "0"
        assert "trial_driver" in head["rayStartParams"]["resources"]
        for c in head["template"]["spec"]["containers"]:
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
        assert spec["workerGroupSpecs"]
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group["maxReplicas"]
            container = group["template"]["spec"]["containers"][0]
            limits, requests = container["resources"]["limits"], container["resources"]["requests"]
            assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
            assert requests == limits, group["groupName"]


def test_kuberay_pods_use_irsa_and_the_private_mlflow(kuberay):
    service = next(d for d in kuberay if d["kind"] == "Service" and d["metadata"]["name"] == "unmix-mlflow")
    policy = next(d for d in kuberay if d["kind"] == "NetworkPolicy")
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
    for _, spec in ray_specs(kuberay):
        for name, template in pod_templates(spec):
            assert not template["spec"].get("hostNetwork"), name
            for c in template["spec"]["containers"]:
                assert all("hostPort" not in p for p in c.get("ports", [])), name


def test_kuberay_no_credentials(kuberay):
    for doc in kuberay:
        assert not [s for s in strings(doc) if is_secret_like(s)], doc["metadata"]["name"]
    for _, spec in ray_specs(kuberay):
        for _, template in pod_templates(spec):
            for c in template["spec"]["containers"]:
                for e in c.get("env", []):
                    if is_secret_name(e["name"]):
                        assert "value" not in e, e["name"]  # secrets come from valueFrom only


def test_kuberay_image_pins_the_project_dependencies(kuberay):
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert f"FROM {IMAGE}" in dockerfile
    # Installs [project].dependencies straight from pyproject.toml, so they cannot drift.
    assert "tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']" in dockerfile
    assert "pip install --no-cache-dir -r /tmp/requirements.txt" in dockerfile
    images = {c["image"] for _, spec in ray_specs(kuberay) for _, t in pod_templates(spec)
              for c in t["spec"]["containers"]}
    assert images == {"unmix-ray:0.1.0"}
