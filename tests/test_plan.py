"""The trial plan, its GPU-hour estimate, and concurrency from cluster resources."""

from __future__ import annotations

import pytest
import yaml

from unmix_ray.compose import load_sweep
from unmix_ray.config import (
    CONFIG_DIR,
    ConfigError,
    DatasetConfig,
    EvalConfig,
    GridConfig,
    MethodConfig,
    MixtureConfig,
    Sweep,
    SweepConfig,
    TrainConfig,
    TrialConfig,
    TuneSettings,
    build,
)
from unmix_ray.orchestration.plan import DEFAULT_CLUSTER, dry_run, estimate_trial, format_plan, plan_sweep
from unmix_ray.orchestration.resources import (
    ClusterSpec,
    driver_resources,
    max_concurrent_trials,
    sweep_max_concurrent,
    trial_resources,
)
from unmix_ray.orchestration.throughput import THROUGHPUT_PATH, ThroughputTable, load_throughput

PAPER_SWEEP = CONFIG_DIR / "sweeps" / "paper.yaml"
PAPER_DATASETS = ["cifar10", "cifar100", "stl10", "tiny_imagenet", "imagenet"]
PAPER_METHODS = ["simclr", "byol", "moco_v1", "moco_v2", "swav"]

# ----------------------------------------------------------------------------------------------
# A small table whose numbers are easy to check by hand.

SMALL_TABLE = {
    "reference_gpu": "big",
    "sources": {"hand": "made up for the test"},
    "gpus": [
        {"name": "big", "relative_speed": 1.0, "usd_per_gpu_hour": 4.0, "instances": ["x8"],
         "source": ["hand"]},
        {"name": "small", "relative_speed": 0.5, "usd_per_gpu_hour": 1.0, "instances": ["x1"],
         "source": ["hand"]},
    ],
    "placement": [{"min_gpus": 2, "gpu": "big"}, {"min_gpus": 1, "gpu": "small"}],
    "methods": [
        {"name": "moco_v2", "step_units": 4, "unmix_extra_units": 3, "source": ["hand"]},
        {"name": "simclr", "step_units": 6, "unmix_extra_units": 3, "source": ["hand"]},
    ],
    "dataset_sizes": {"source": ["hand"], "splits": {"toy": {"train": 1000, "test": 200}}},
    "throughput": [
        {"datasets": ["toy"], "backbone": "resnet18_cifar", "samples_per_s": {"moco_v2": 100, "simclr": 50},
         "source": ["hand"], "measured": True},
    ],
}


def small_table(**changes) -> ThroughputTable:
    return build(ThroughputTable, SMALL_TABLE | changes)


def toy_trial(method="moco_v2", mixture="mixup", epochs=10, workers=1, use_gpu=True, dataset="toy",
              test_split="test", cpus=3.0) -> TrialConfig:
    ds = DatasetConfig(name=dataset, root="/x", loader="unmix_ray.data.npz", num_classes=10, channels=3,
                       image_size=32, crop_size=32, mean=(0.5,) * 3, std=(0.2,) * 3, test_split=test_split)
    train = TrainConfig(epochs=epochs, batch_size=128, num_workers=workers, use_gpu=use_gpu,
                        cpus_per_worker=cpus)
    return TrialConfig(sweep="t", seed=0, dataset=ds, method=MethodConfig(name=method),
                       mixture=MixtureConfig(type=mixture), train=train, eval=EvalConfig(knn_every=10))


def test_estimate_maths():
    tp = estimate_trial(toy_trial(), small_table())
    # 1000 images in whole batches of 128 -> 896 per epoch, 10 epochs; MoCo with Un-Mix costs 7/4.
    assert tp.gpu_type == "small" and tp.pretrain_samples == 8960
    assert tp.pretrain_gpu_hours == pytest.approx(8960 * 1.75 / (100 * 0.5) / 3600)
    # kNN every 10 epochs (1) plus the final evaluation (1): (1000 + 200) feature passes each,
    # at 100 samples/s x 4 units x 0.5 speed.
    assert tp.eval_gpu_hours == pytest.approx(2 * 1200 / (100 * 4 * 0.5) / 3600)
    assert tp.cost_usd == pytest.approx(tp.gpu_hours * 1.0)
    assert tp.measured


def test_unmix_cost_factors_follow_the_extra_passes():
    table = small_table()
    for method, factor in (("moco_v2", 1.75), ("simclr", 1.5)):
        base = estimate_trial(toy_trial(method, "none"), table)
        for mixture in ("mixup", "cutmix", "both"):
            mixed = estimate_trial(toy_trial(method, mixture), table)
            assert mixed.pretrain_gpu_hours / base.pretrain_gpu_hours == pytest.approx(factor)
            assert mixed.eval_gpu_hours == pytest.approx(base.eval_gpu_hours)
    real = load_throughput()
    assert {m.name: m.unmix_factor for m in real.methods} == {
        "simclr": 1.5, "byol": 1.5, "moco_v1": 1.75, "moco_v2": 1.75, "swav": 1.5}


def test_gpu_hours_do_not_depend_on_the_number_of_gpus_of_the_same_type():
    table = small_table(placement=[{"min_gpus": 1, "gpu": "big"}])
    one, eight = (estimate_trial(toy_trial(workers=w), table) for w in (1, 8))
    assert one.gpu_type == eight.gpu_type == "big"
    assert eight.gpu_hours == pytest.approx(one.gpu_hours)


def test_untrained_reference_costs_one_evaluation():
    tp = estimate_trial(toy_trial(epochs=0), small_table())
    assert tp.pretrain_gpu_hours == 0
    assert tp.eval_gpu_hours == pytest.approx(1200 / (100 * 4 * 0.5) / 3600)


def test_trials_without_an_estimate_say_why():
    table = small_table()
    assert "CPU trial" in estimate_trial(toy_trial(use_gpu=False), table).note
    assert "no size for a split" in estimate_trial(toy_trial(test_split="val"), table).note
    assert "no throughput figure" in estimate_trial(toy_trial(method="byol"), table).note
    assert estimate_trial(toy_trial(dataset="other"), table).gpu_hours is None


def test_table_problems_are_reported():
    with pytest.raises(ConfigError) as err:
        methods = [{"name": "moco_v2", "step_units": 4, "unmix_extra_units": 3, "source": ["nowhere"]}]
        small_table(reference_gpu="nope", throughput=SMALL_TABLE["throughput"] * 2, methods=methods)
    text = str(err.value)
    assert "reference_gpu" in text and "unknown source 'nowhere'" in text
    assert "toy/resnet18_cifar/moco_v2 is given more than once" in text
    assert "samples_per_s.simclr: no methods entry" in text


def test_the_throughput_table_is_complete_and_cited():
    table = load_throughput(THROUGHPUT_PATH)
    for group in table.throughput:
        assert group.source and all(k in table.sources for k in group.source)
    # The paper recipes: ResNet-18 (CIFAR stem) on the small datasets, ResNet-50 on ImageNet.
    for dataset in PAPER_DATASETS:
        backbone = "resnet50" if dataset == "imagenet" else "resnet18_cifar"
        for method in PAPER_METHODS:
            assert table.rate(dataset, backbone, method) is not None, (dataset, method)
    raw = yaml.safe_load(THROUGHPUT_PATH.read_text())
    assert set(raw["sources"]) == {k for g in table.gpus for k in g.source} | {
        k for m in table.methods for k in m.source} | set(table.dataset_sizes.source) | {
        k for g in table.throughput for k in g.source}, "every source is cited and every citation exists"


ESTIMATE = {"datasets": ["toy"], "backbone": "resnet18_cifar", "samples_per_s": {"simclr": 50}, "source": ["hand"]}
MEASURED = {"datasets": ["toy"], "backbone": "resnet18_cifar", "samples_per_s": {"simclr": 40}, "source": ["hand"],
            "measured": True, "gpu": "small", "command": "python bench/gpu.py --out bench/results/small.json"}


def test_a_measured_figure_is_used_before_an_estimate_whatever_the_order():
    samples = 8960  # 1000 images in whole batches of 128, 10 epochs
    for groups in ([ESTIMATE, MEASURED], [MEASURED, ESTIMATE]):
        table = small_table(throughput=groups)
        # 1 GPU lands on "small": the measured 40/s there, not the estimate's 50 x 0.5 = 25/s.
        one = estimate_trial(toy_trial("simclr", "none"), table)
        assert (one.gpu_type, one.measured, one.figure_gpu) == ("small", True, "small")
        assert one.command == MEASURED["command"]
        assert one.pretrain_gpu_hours == pytest.approx(samples / 40 / 3600)
        # 2 GPUs land on "big": the measurement converted by relative speed (40 / 0.5 = 80/s) before the
        # estimate made for "big" itself (50/s).
        two = estimate_trial(toy_trial("simclr", "none", workers=2), table)
        assert (two.gpu_type, two.measured, two.figure_gpu) == ("big", True, "small")
        assert two.pretrain_gpu_hours == pytest.approx(samples / 80 / 3600)
    only_estimate = estimate_trial(toy_trial("simclr", "none"), small_table(throughput=[ESTIMATE]))
    assert not only_estimate.measured and only_estimate.command is None
    assert only_estimate.pretrain_gpu_hours == pytest.approx(samples / (50 * 0.5) / 3600)


def test_the_plan_counts_measured_figures_and_names_their_command():
    trials = [toy_trial("simclr", "none"), toy_trial("simclr", "none", workers=2), toy_trial("moco_v2", "none")]
    estimate = ESTIMATE | {"samples_per_s": {"simclr": 50, "moco_v2": 60}}
    sweep = Sweep(SweepConfig(name="toy", grid=GridConfig(dataset=["toy"], method=["simclr", "moco_v2"])), trials)
    plan = plan_sweep(sweep, small_table(throughput=[estimate, MEASURED]))
    assert (plan.figures_measured, plan.figures_estimated) == (1, 1)  # toy/resnet18_cifar/{simclr, moco_v2}
    text = format_plan(plan)
    assert "2 documented estimates" not in text and "1 documented estimates and 1 measured" in text
    assert ("measured on small, converted to big by relative speed: toy/resnet18_cifar/simclr by "
            "`python bench/gpu.py --out bench/results/small.json`") in text
    unmeasured = format_plan(plan_sweep(sweep, small_table(throughput=[estimate])))
    assert "measured on" not in unmeasured and "2 documented estimates and 0 measured" in unmeasured


def test_measured_and_estimated_figures_may_coexist_but_not_twice_each():
    small_table(throughput=[ESTIMATE, MEASURED, MEASURED | {"gpu": None}])  # one of each per GPU: fine
    with pytest.raises(ConfigError) as err:
        small_table(throughput=[MEASURED, MEASURED | {"samples_per_s": {"simclr": 41}}, MEASURED | {"gpu": "tiny"}])
    text = str(err.value)
    assert "toy/resnet18_cifar/simclr is given more than once (measured, for small)" in text
    assert "throughput[2].gpu: unknown gpu 'tiny'" in text


def test_the_h200_is_in_the_table_as_a_documented_estimate():
    table = load_throughput(THROUGHPUT_PATH)
    h200 = table.gpu("h200")
    assert not h200.measured and h200.source and h200.relative_speed > 1 and h200.usd_per_gpu_hour > 0
    a100 = table.rate("cifar10", "resnet18_cifar", "simclr")
    on_h200 = table.rate("cifar10", "resnet18_cifar", "simclr", "h200")
    assert on_h200.samples_per_s == pytest.approx(a100.samples_per_s * h200.relative_speed)


# ----------------------------------------------------------------------------------------------
# Resources and concurrency


def test_trial_resources_add_driver_and_workers():
    trial = toy_trial(workers=8, cpus=10)
    driver = driver_resources(TuneSettings(trial_cpus=0.5, trial_resources={"trial_driver": 1}))
    assert driver == {"CPU": 0.5, "trial_driver": 1.0}
    assert trial_resources(trial, driver) == {"CPU": 80.5, "GPU": 8.0, "trial_driver": 1.0}


def test_max_concurrent_trials_pooled():
    trial = toy_trial(cpus=3)
    assert max_concurrent_trials({"CPU": 16, "GPU": 4}, trial) == 4
    assert max_concurrent_trials({"CPU": 8, "GPU": 4}, trial) == 2
    assert max_concurrent_trials({"CPU": 16, "GPU": 4, "trial_driver": 3}, trial, {"trial_driver": 1}) == 3
    assert max_concurrent_trials({"CPU": 16, "GPU": 4}, trial, {"trial_driver": 1}) == 0
    assert max_concurrent_trials({"CPU": 16}, toy_trial(use_gpu=False, cpus=2)) == 8
    assert max_concurrent_trials({"CPU": 2, "GPU": 0.0}, trial) == 0


def test_max_concurrent_trials_per_node_respects_node_boundaries():
    nodes = [{"CPU": 96, "GPU": 8}] * 2 + [{"CPU": 4, "GPU": 1}] * 16
    big = toy_trial(workers=8, cpus=10)
    assert max_concurrent_trials(nodes, big) == 2  # a 10-CPU worker does not fit on a 4-CPU node
    pooled = {"CPU": 2 * 96 + 16 * 4, "GPU": 32}
    assert max_concurrent_trials(pooled, big) == 3  # the pooled view cannot see that
    assert max_concurrent_trials(nodes, toy_trial(cpus=3)) == 32


def test_launcher_cluster_at_full_scale():
    spec = ClusterSpec.from_launcher(DEFAULT_CLUSTER)
    assert len(spec.nodes) == 1 + 16 + 2  # head, g5.xlarge up to 16, p4d.24xlarge up to 2 (spot types at 0)
    assert spec.total["GPU"] == 32 and spec.total["trial_driver"] == 24
    assert spec.gpus_by_type == {"a10g": 16, "a100": 16}


def test_sweep_concurrency_names_trials_that_never_fit():
    sweep = load_sweep(PAPER_SWEEP)
    # 1-GPU trials ask for the A10G nodes (accelerator_type:A10G): 16 run at once, none on an A100, beside
    # the 2 ImageNet trials the two 8-GPU nodes hold.
    assert sweep_max_concurrent(ClusterSpec.from_launcher(DEFAULT_CLUSTER).nodes, sweep) == 16 + 2
    small = [{"CPU": 4, "GPU": 1}] * 4 + [{"trial_driver": 8}]
    with pytest.raises(ValueError, match="can never start.*imagenet"):
        sweep_max_concurrent(small, sweep)


# ----------------------------------------------------------------------------------------------
# The paper sweep


def test_paper_sweep_structure_and_plan():
    sweep = load_sweep(PAPER_SWEEP)
    trained = [t for t in sweep.trials if t.variant != "untrained"]
    assert len(sweep.trials) == 375 and len(trained) == 5 * 5 * 4 * 3
    assert {t.variant for t in trained} == {"none", "mixup", "cutmix", "both@0.5"}
    assert {t.seed for t in trained} == {0, 1, 2}
    assert all(t.train.use_gpu for t in sweep.trials)
    cell = {(t.dataset.name, t.method.name): t.train for t in trained}
    assert cell["imagenet", "moco_v2"] == cell["imagenet", "swav"]
    inet = cell["imagenet", "moco_v2"]
    assert (inet.backbone, inet.num_workers, inet.epochs, inet.batch_size) == ("resnet50", 8, 200, 256)
    assert cell["cifar10", "moco_v1"].batch_size == 512 and cell["cifar10", "swav"].batch_size == 128
    assert cell["stl10", "simclr"].epochs == cell["stl10", "byol"].epochs == 2000
    assert cell["stl10", "moco_v2"].epochs == cell["tiny_imagenet", "simclr"].epochs == 1000
    assert sweep.config.tune.trial_resources == {"trial_driver": 1}

    plan = plan_sweep(sweep, cluster=DEFAULT_CLUSTER)
    assert not plan.unestimated
    assert set(plan.gpu_hours_by_type) == {"a100", "a10g"}
    assert all(t.gpu_type == ("a100" if t.dataset == "imagenet" else "a10g") for t in plan.trials)
    assert plan.max_concurrent == 18
    assert plan.figures_estimated == 25 and plan.figures_measured == 0
    # The figures docs/cluster.md states, from the recipes of docs/recipes.md and configs/throughput.yaml.
    assert round(plan.total_gpu_hours) == 45_628 and round(plan.cost_usd) == 117_798
    assert {g: round(h) for g, h in plan.gpu_hours_by_type.items()} == {"a100": 23_237, "a10g": 22_391}
    text = format_plan(plan)
    assert all(t.run_name in text for t in sweep.trials)
    assert "GPU-hours (estimate)" in text and "max concurrent trials: 18" in text


def test_dry_run_of_the_cpu_demo():
    text = dry_run("configs/sweeps/demo.yaml")
    assert "Sweep 'demo': 7 trials (6 pretraining, 1 untrained-encoder references)" in text
    assert "CPU trial: no GPU-hours" in text
    assert "Cluster this machine" in text
