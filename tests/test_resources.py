"""Placement by GPU kind, packing, and clusters read from a launcher YAML or a KubeRay manifest."""

from __future__ import annotations

import pytest

from unmix_ray.compose import load_sweep
from unmix_ray.orchestration.resources import (
    load_cluster,
    max_concurrent_trials,
    sweep_max_concurrent,
    sweep_placements,
    trial_placement,
)

from .conftest import ROOT

PAPER = ROOT / "configs/sweeps/paper.yaml"
A10G = {"CPU": 4.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}
A100 = {"CPU": 96.0, "GPU": 8.0, "accelerator_type:A100": 1.0}


@pytest.fixture(scope="module")
def paper():
    sweep = load_sweep(PAPER)
    return sweep, {(t.dataset.name, t.variant): t for t in sweep.trials if t.seed == 0 and t.method.name == "moco_v2"}


def test_trials_ask_for_their_planned_gpu_kind_where_the_cluster_declares_kinds(paper):
    _, trials = paper
    small, imagenet = trials["cifar10", "none"], trials["imagenet", "none"]
    p = trial_placement(small, accelerators={"A10G", "A100"})
    assert p.accelerator_type == "A10G" and p.resources_per_worker["accelerator_type:A10G"] == 0.001
    p = trial_placement(imagenet, accelerators={"A10G", "A100"})
    assert (p.accelerator_type, p.strategy) == ("A100", "STRICT_PACK")
    assert trial_placement(small, accelerators=set()).accelerator_type is None  # a machine with any GPU


def test_small_trials_never_take_the_8_gpu_nodes_and_imagenet_packs_on_one(paper):
    _, trials = paper
    nodes = [A10G] * 3 + [A100] * 2
    kinds = {"A10G", "A100"}
    small = trial_placement(trials["cifar10", "none"], accelerators=kinds)
    assert max_concurrent_trials(nodes, trials["cifar10", "none"], placement=small) == 3  # not 3 + 16
    big = trial_placement(trials["imagenet", "none"], accelerators=kinds)
    assert max_concurrent_trials(nodes, trials["imagenet", "none"], placement=big) == 2
    split = [A10G] * 3 + [dict(A100, GPU=4.0)] * 4  # 16 A100 GPUs, but no node with 8 of them
    assert max_concurrent_trials(split, trials["imagenet", "none"], placement=big) == 0


def test_a_sweep_that_cannot_fit_names_the_resources(paper):
    sweep, _ = paper
    nodes = [{"CPU": 16.0, "trial_driver": 24.0}] + [A10G] * 4
    with pytest.raises(ValueError) as e:
        sweep_max_concurrent(nodes, sweep, sweep_placements(nodes, sweep))
    text = str(e.value)
    assert "can never start" in text and "imagenet" in text and "GPU 1" in text


@pytest.mark.parametrize("path", ["cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml"])
def test_a_kuberay_manifest_describes_the_same_cluster_as_the_launcher_config(path):
    aws, kuberay = load_cluster(ROOT / "cluster/aws-gpu.yaml"), load_cluster(ROOT / path)
    gpu_nodes = sorted(sorted(n.items()) for n in kuberay.nodes if n.get("GPU"))
    assert [dict(n)["GPU"] for n in gpu_nodes] == [dict(n)["GPU"] for n in sorted(
        sorted(n.items()) for n in aws.nodes if n.get("GPU"))]
    assert kuberay.gpus_by_type == aws.gpus_by_type
    assert kuberay.total["trial_driver"] == aws.total["trial_driver"]


def test_a_file_that_is_no_cluster_is_refused(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("kind: Deployment\n")
    with pytest.raises(ValueError, match="neither a Ray cluster launcher config nor a KubeRay"):
        load_cluster(bad)
