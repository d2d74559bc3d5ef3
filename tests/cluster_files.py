"""What the cluster tests share: the cluster files, parsed, and the facts they are checked against."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "cluster" / "aws-gpu.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
DOCKERFILE = ROOT / "cluster" / "Dockerfile"
PAPER = ROOT / "configs" / "sweeps" / "paper.yaml"
DOCS = ROOT / "docs" / "cluster.md"
BASE_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
IMAGE_HOME = "/home/ray/unmix-ray"  # the Dockerfile's WORKDIR: the project inside the image
K8S_VERSION = "1.33"  # Kubernetes (EKS) version the manifests are validated against
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


def load_aws() -> dict:
    return yaml.safe_load(AWS.read_text())


def load_kuberay() -> list[dict]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def load_paper() -> dict:
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


def local_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(marker, commands) of every ```sh local / ```sh local-error block: commands a test can run here."""
    blocks = re.findall(r"^ *```sh (local(?:-error)?)\n(.*?)^ *```$", text, re.M | re.S)
    return [(marker, [c.strip() for c in body.replace("\\\n", " ").splitlines()
                      if c.strip() and not c.strip().startswith("#")]) for marker, body in blocks]
