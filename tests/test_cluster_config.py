"""The AWS cluster launcher config, checked offline: Ray's own validation, and the invariants the project
relies on (GPU placement by accelerator type, a head sized for its trials, one image holding the lock,
nothing installed at boot, IMDSv2, no security group from Ray, datasets from S3, no credentials), plus
docs/cluster.md's commands and paths. The KubeRay manifests: tests/test_cluster_kuberay.py."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib

import pytest

from unmix_ray.orchestration.throughput import load_throughput
from unmix_ray.redact import is_secret_like

from .cluster_files import (
    ACCELERATOR,
    AWS,
    BASE_IMAGE,
    DOCKERFILE,
    DOCS,
    IMAGE_HOME,
    INSTALLS,
    INSTANCES,
    ROOT,
    all_commands,
    all_pod_specs,
    containers,
    gib,
    head_memory_model,
    image_parts,
    local_blocks,
    ray_specs,
    start_param_resources,
    strings,
    worker_types,
)


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
    from unmix_ray.orchestration.resources import load_head_memory

    trials, per_trial, services, total = head_memory_model()
    assert total == pytest.approx(trials * per_trial + services)
    model = load_head_memory()  # the measured figures: the comment states them, it does not own them
    assert (per_trial, services) == (model.per_trial_gib, model.base_gib)
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
    # SQLAlchemy 2.1 takes psycopg (3) for postgresql:// URIs.
    assert {"psycopg", "psycopg-binary"} <= set(pins), "requirements.lock has no PostgreSQL driver"


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


# ----------------------------------------------------------------------------------------------
# Datasets


SMALL_ARCHIVES = {  # each dataset's original archive, as its loader's LAYOUT names it
    "cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz",
    "stl10": "stl10_binary.tar.gz", "tiny_imagenet": "tiny-imagenet-200.zip",
}


def test_paper_datasets_are_staged_from_s3(paper_yaml, aws):
    bucket = paper_yaml["tune"]["storage_path"].split("/")[2]
    datasets = {k: v for k, v in paper_yaml["datasets"].items() if k in paper_yaml["grid"]["dataset"]}
    assert set(datasets) == set(paper_yaml["grid"]["dataset"])  # the other keys are per-method recipe overrides
    data_mount = next(o.split()[1].split(":")[0] for o in aws["docker"]["run_options"] if "/mnt/data" in o)
    for name, entry in datasets.items():
        assert entry["root"] == f"{data_mount}/{name}", name  # the host folder each container writes
        expected = SMALL_ARCHIVES.get(name, f"{name}/")
        assert entry["source"] == f"s3://{bucket}/datasets/{expected}", name
    assert not data_mount.endswith(":ro")


# ----------------------------------------------------------------------------------------------
# docs/cluster.md


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
