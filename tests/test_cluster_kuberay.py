"""The KubeRay manifests, checked offline against Kubernetes' schemas (kubernetes-validate bundles them)
and the invariants the project relies on (the RayJob runs the RayCluster's spec with --cluster, GPU
groups from zero with their accelerator types, the FSx datasets volume read-only, MLflow on
PostgreSQL with the password from a Secret, nothing public, no credentials).

The Ray resources (RayCluster, RayJob) are checked against KubeRay's own CRD schemas, kept in
tests/kuberay_crds/ (each file names the KubeRay release and commit it was taken from), with unknown
fields made errors as `kubectl apply --validate=strict` makes them; their pod templates against
Kubernetes' PodTemplateSpec as well."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from unmix_ray.redact import is_secret_like, is_secret_name

from .cluster_files import (
    ACCELERATOR,
    IMAGE_HOME,
    INSTANCES,
    K8S_VERSION,
    ROOT,
    all_pod_specs,
    by_name,
    containers,
    gib,
    pod_templates,
    ray_specs,
    start_param_resources,
    strings,
    worker_types,
)


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


CRDS = Path(__file__).parent / "kuberay_crds"
KUBERAY = "v1.5.1"  # the oldest KubeRay docs/cluster.md supports: a field it lacks is an error


def strict(schema):
    """Unknown fields become errors: every object schema that lists its properties and keeps no unknown
    fields (``x-kubernetes-preserve-unknown-fields``) gets ``additionalProperties: false``."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_errors():
    """Every error of a ray.io/v1 object against its KubeRay CRD schema, as 'path: message' lines."""
    import jsonschema

    validators = {}
    for kind in ("RayCluster", "RayJob"):
        crd = json.loads(gzip.decompress((CRDS / f"{kind.lower()}-{KUBERAY}.json.gz").read_bytes()))
        assert crd["kind"] == kind and f"/{KUBERAY}/" in crd["source"]
        validators[kind] = jsonschema.Draft7Validator(strict(crd["openAPIV3Schema"]))

    def errors(doc: dict) -> list[str]:
        return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in validators[doc["kind"]].iter_errors(doc))
    return errors


def test_ray_resources_match_kuberays_crd_schemas(kuberay, crd_errors):
    docs = [d for d in kuberay if d["kind"] in ("RayCluster", "RayJob")]
    assert {d["kind"] for d in docs} == {"RayCluster", "RayJob"}
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        assert crd_errors(doc) == [], doc["kind"]


def test_crd_validation_finds_mistakes(kuberay, crd_errors):
    cluster = copy.deepcopy(next(d for d in kuberay if d["kind"] == "RayCluster"))
    group = cluster["spec"]["workerGroupSpecs"][0]
    group["minReplica"] = group.pop("minReplicas")  # a typo
    group["maxReplicas"] = "4"  # a string where KubeRay wants an integer
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    found = "\n".join(crd_errors(cluster))
    assert "'minReplica' was unexpected" in found
    assert "workerGroupSpecs.0.maxReplicas: '4' is not of type 'integer'" in found
    assert "imagePullPolicy: 3 is not of type 'string'" in found
    job = copy.deepcopy(next(d for d in kuberay if d["kind"] == "RayJob"))
    job["spec"]["entryPoint"] = job["spec"].pop("entrypoint")
    assert any("'entryPoint' was unexpected" in e for e in crd_errors(job))


def test_ray_resources_as_the_project_needs_them(kuberay):
    """What the schemas allow but the project relies on: token auth, unique group names, and resources
    in rayStartParams that Ray can parse, a submission mode the operator knows (the CRD takes any string)."""
    job = next(d for d in kuberay if d["kind"] == "RayJob")
    assert job["spec"]["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    for kind, spec in ray_specs(kuberay):
        assert spec["authOptions"] == {"mode": "token"}, kind
        names = [g["groupName"] for g in spec["workerGroupSpecs"]]
        assert len(set(names)) == len(names), names
        for group in spec["workerGroupSpecs"]:
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", group["groupName"])
        for params in [spec["headGroupSpec"]["rayStartParams"]] + [g["rayStartParams"] for g in
                                                                    spec["workerGroupSpecs"]]:
            start_param_resources(params)


def test_rayjob_runs_the_paper_sweep_on_the_raycluster_spec(kuberay, paper_yaml):
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
    imagenet = apply_overrides(paper_yaml, overrides)["datasets"]["imagenet"]
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


def test_kuberay_datasets_volume_is_fsx_mounted_read_only(kuberay, paper_yaml):
    pv = by_name(kuberay, "PersistentVolume", "unmix-ray-datasets")
    pvc = by_name(kuberay, "PersistentVolumeClaim", "unmix-ray-datasets")
    assert pv["spec"]["csi"]["driver"] == "fsx.csi.aws.com"
    assert pv["spec"]["csi"]["volumeHandle"].startswith("fs-")
    assert pv["spec"]["accessModes"] == pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # FSx CSI: no ROX
    assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"] == ""  # bound statically
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["claimRef"] == {"namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"]}
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    staged = {n: d["root"] for n, d in paper_yaml["datasets"].items() if d.get("source")}
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


