"""On a real (local, multi-node) Ray cluster: GPU trials land only on nodes of their planned kind, a sweep
on a cluster scaled to zero starts and runs once a worker appears, and a trial that finds no room fails
within the bounded wait, naming what it waited for."""

from __future__ import annotations

import json
import threading
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from unmix_ray.compose import load_sweep
from unmix_ray.orchestration.resources import load_cluster, sweep_placements

from .conftest import ROOT

SMALL = ["grid.mixture=[none]", "grid.seed=[0]", "untrained_reference=false", "train.epochs=1", "train.batch_size=32",
         "train.torch_threads=1", "datasets.fashion_mnist.train_subset=256", "datasets.fashion_mnist.test_subset=100",
         "eval.linear_epochs=1", "eval.knn_k=10", "eval.knn_every=0", "tune.system_metrics_s=0",
         "tune.log_encoder=false"]


@pytest.fixture(scope="module")
def cluster():
    """A head that offers no CPUs for tasks (like the real one); workers are added by the tests. One
    cluster for the module, its start being the slow part: the tests run in file order, each adding
    the nodes it needs, so the first one still meets a head alone."""
    import ray
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(ROOT))
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"trial_driver": 4}})
        ray.init(address=c.address)
        yield c
        ray.shutdown()
        c.shutdown()


def kuberay_manifest(path, groups: dict[str, dict]) -> str:
    """A RayCluster whose worker groups autoscale from zero: what the sweep is told with --cluster."""
    spec = {"headGroupSpec": {"rayStartParams": {"num-cpus": "0", "resources": '"{\\"trial_driver\\": 4}"'},
                              "template": {"spec": {"containers": [{"name": "h", "resources": {}}]}}},
            "workerGroupSpecs": [{"groupName": name, "minReplicas": 0, "maxReplicas": 1, "rayStartParams": params,
                                  "template": {"spec": {"containers": [{"name": "w", "resources": {}}]}}}
                                 for name, params in groups.items()]}
    path.write_text(yaml.safe_dump({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "t"},
                                    "spec": spec}))
    return str(path)


def run_in_thread(sweep, uri, cluster_file):
    from unmix_ray.orchestration.sweep import run_sweep

    box = {}

    def target():
        try:
            box["table"] = run_sweep(sweep, uri, cluster=cluster_file)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            box["error"] = e

    thread = threading.Thread(target=target)  # Cluster.add_node must stay on the main thread
    thread.start()
    return thread, box


@pytest.mark.slow
@pytest.mark.ray
def test_a_trial_that_never_finds_room_fails_in_bounded_time_naming_what_it_waited_for(cluster, tmp_path):
    manifest = kuberay_manifest(tmp_path / "raycluster.yaml", {"big": {"num-cpus": "8"}})
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", SMALL + [
        "train.cpus_per_worker=8", "tune.placement_timeout_s=15", f"tune.storage_path={tmp_path / 'ray'}"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.monotonic()
    thread, box = run_in_thread(sweep, uri, manifest)
    thread.join(timeout=300)
    assert time.monotonic() - start < 200
    assert box["table"].failed == 1
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("unmix-ray").experiment_id],
                                "tags.`unmix.role` = 'trial'")
    assert run.info.status == "FAILED"
    assert "no room for 1 worker(s) of {CPU 8}" in run.data.tags["unmix.error"]
    assert "after 15 s" in run.data.tags["unmix.error"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_on_a_cluster_at_zero_runs_once_a_worker_appears(cluster, tmp_path, small_fashion_mnist):
    manifest = kuberay_manifest(tmp_path / "raycluster.yaml", {"cpu": {"num-cpus": "2"}})
    sweep = load_sweep(ROOT / "configs/sweeps/demo.yaml", SMALL + [
        f"tune.storage_path={tmp_path / 'ray'}", f"datasets.fashion_mnist.root={small_fashion_mnist}"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    thread, box = run_in_thread(sweep, uri, manifest)
    time.sleep(10)  # the sweep started on a head with no CPUs: the trial waits for room
    assert thread.is_alive() and "error" not in box
    cluster.add_node(num_cpus=2)  # the autoscaler's worker
    thread.join(timeout=600)
    assert "error" not in box, box.get("error")
    assert box["table"].complete


@pytest.mark.slow
@pytest.mark.ray
def test_one_gpu_trials_never_land_on_the_eight_gpu_kind(cluster, tmp_path):
    """GPU nodes of two kinds (their GPUs declared, as Ray trusts a node's declaration); each trial's workers
    run the Ray Train the trials run, with the placement the sweep plans, and say where they landed."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from unmix_ray.orchestration.trial import scaling_config

    small = cluster.add_node(num_cpus=2, num_gpus=1, resources={"accelerator_type:A10G": 1})
    big = cluster.add_node(num_cpus=8, num_gpus=8, resources={"accelerator_type:A100": 1})
    sweep = load_sweep(ROOT / "configs/sweeps/paper.yaml", ["grid.seed=[0]", "grid.mixture=[none]",
                                                            "untrained_reference=false", "grid.method=[simclr]",
                                                            "grid.dataset=[cifar10, imagenet]",
                                                            "train.cpus_per_worker=1",
                                                            "train_overrides.imagenet.cpus_per_worker=1"])
    assert {t.dataset.name: t.train.cpus_per_worker for t in sweep.trials} == {"cifar10": 1, "imagenet": 1}
    aws = load_cluster(ROOT / "cluster/aws-gpu.yaml")
    placements = sweep_placements(aws.nodes, sweep)

    def where(config):
        import ray
        import ray.train

        path = f"{config['out']}-{ray.train.get_context().get_world_rank()}.json"
        with open(path, "w") as f:
            json.dump(ray.get_runtime_context().get_node_id(), f)

    landed = {}
    for trial in sweep.trials:
        out = tmp_path / trial.dataset.name
        TorchTrainer(where, train_loop_config={"out": str(out)}, torch_config=TorchConfig(backend="gloo"),
                     scaling_config=scaling_config(trial, placements[trial.run_name]),
                     run_config=RunConfig(name=f"where-{trial.dataset.name}", storage_path=str(tmp_path / "r"),
                                          # a placement that cannot start fails here instead of retrying
                                          failure_config=FailureConfig(controller_failure_limit=0))).fit()
        landed[trial.dataset.name] = {json.loads(p.read_text()) for p in tmp_path.glob(f"{trial.dataset.name}-*.json")}
    assert landed["cifar10"] == {small.node_id}  # the A100 node had room too, and was not taken
    assert landed["imagenet"] == {big.node_id}  # 8 workers, packed on the one 8-GPU node
