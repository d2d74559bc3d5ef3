"""Bad input fails early and clearly: every malformed config and command below exits with status 2,
prints no traceback, names what is wrong, starts no Ray and creates no MLflow store."""

from __future__ import annotations

import gzip
import pickle
import shutil
import subprocess
import sys

import pytest
import ray
import torch

from .conftest import ROOT
from .test_report import load_job

DEMO = str(ROOT / "configs/sweeps/demo.yaml")

# (--set overrides, fragments the error must contain)
CONFIG_CASES = {
    "nan lr": (["methods.simclr.optim.lr=.nan"], ["methods/simclr.yaml", "optim.lr", "finite number"]),
    "inf knn_t": (["eval.knn_t=.inf"], ["sweep.eval.knn_t", "finite number"]),
    "zero batch": (["train.batch_size=0"], ["train.batch_size", "must be >= 2, got 0"]),
    "empty mixture grid": (["grid.mixture=[]"], ["sweep.grid.mixture", "must not be empty"]),
    "empty seed grid": (["grid.seed=[]"], ["sweep.grid.seed", "must not be empty"]),
    "empty dataset grid": (["grid.dataset=[]"], ["sweep.grid.dataset", "must not be empty"]),
    "crop larger than image": (["datasets.fashion_mnist.crop_size=64"], ["crop_size", "larger than the stored"]),
    "bad precision and backbone": (["train.precision=bf17", "train.backbone=resnet99"],
                                   ["train.precision", "bf17", "train.backbone", "resnet99"]),
    "unknown method": (["grid.method=[simclr, nosuch]"], ["unknown method 'nosuch'"]),
    "unknown dataset": (["grid.dataset=[cifar1000]"], ["unknown dataset 'cifar1000'"]),
    "P above 1": (["grid.prob=[1.5]"], ["grid.prob[0]", "P must be in [0, 1], got 1.5"]),
    "P below 0": (["grid.prob=[-0.1]"], ["got -0.1"]),
    "odd per-worker batch": (["train.batch_size=254", "train.num_workers=2"], ["per-worker batch 127 is odd"]),
    "batch not split evenly": (["train.batch_size=256", "train.num_workers=3"], ["does not split evenly"]),
    "unknown train key": (["train.epochz=3"], ["train.epochz: unknown key"]),
    "unknown top-level key": (["trian={}"], ["sweep.trian: unknown key"]),
    "no workers": (["train.num_workers=0"], ["train.num_workers", "must be >= 1"]),
    "negative epochs": (["train.epochs=-1"], ["train.epochs", "must be >= 0"]),
    "missing loader": (["datasets.fashion_mnist.loader=no_such_module.x"], ["cannot import the loader module"]),
    "asha reduction 1": (["tune.asha={reduction_factor: 1}"], ["tune.asha.reduction_factor", "must be > 1"]),
    "unknown override key": (["train_overrides={nosuch: {epochs: 1}}"], ["train_overrides.nosuch"]),
    "duplicate protocol": (["eval.linear_protocols=[fast, fast]"], ["linear_protocols", "duplicate"]),
    "override of unknown dataset": (["datasets.cifar1000={root: /x}"], ["sweep.datasets.cifar1000"]),
    "beta zero": (["mixture_beta=0"], ["mixture_beta", "must be > 0"]),
    "zero concurrency": (["tune.max_concurrent_trials=0"], ["max_concurrent_trials", "must be >= 1"]),
    "malformed --set value": (["grid.prob=[0.5"], ["--set 'grid.prob=[0.5'", "not valid YAML"]),
    "--set without =": (["no_equals_sign"], ["--set 'no_equals_sign': expected key.path=value"]),
    "GPU trial on this machine": (["train.use_gpu=true"], ["can never start", "GPU 1"]),
    "more CPUs than the machine": (["train.cpus_per_worker=64"], ["can never start", "CPU 64"]),
    "missing data root": (["datasets.fashion_mnist.root=/nonexistent/fashion"], ["data root not found",
                                                                               "/nonexistent/fashion"]),
}


@pytest.fixture
def job(tmp_path, monkeypatch, capsys):
    """Run a job's main() in an empty working directory with the default (SQLite) MLflow store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def run(name: str, *argv: str) -> str:
        code = load_job(name).main(list(argv))
        err = capsys.readouterr().err
        assert code == 2, err
        assert "Traceback" not in err
        assert not ray.is_initialized(), "Ray was started"
        assert not list(tmp_path.glob("mlflow.db")) and not (tmp_path / "mlruns").exists(), "an MLflow store"
        return err

    return run


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_malformed_config_fails_before_ray(job, case):
    sets, fragments = CONFIG_CASES[case]
    err = job("sweep", "--config", DEMO, *[a for s in sets for a in ("--set", s)])
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_every_field_of_a_block_is_checked(job):
    err = job("sweep", "--config", DEMO, "--set", "train.precision=bf17", "--set", "train.backbone=resnet99",
              "--set", "train.epochs=-2", "--set", "eval.knn_k=0", "--set", "eval.knn_t=-1")
    for key in ("train.precision", "train.backbone", "train.epochs", "eval.knn_k", "eval.knn_t"):
        assert key in err


def test_yaml_syntax_error_is_one_line_with_its_position(job, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrid:\n  dataset: [fashion_mnist\n  method: [simclr]\n")
    err = job("sweep", "--config", str(bad))
    assert f"{bad}:4:" in err and "YAML syntax error" in err
    assert len([line for line in err.splitlines() if line.strip()]) <= 3


def test_a_missing_config_file(job, tmp_path):
    assert "no such sweep config" in job("sweep", "--config", str(tmp_path / "nope.yaml"))


def test_resume_of_an_unknown_sweep_writes_nothing(job):
    assert "no sweep named or with id 'no-such-sweep'" in job("sweep", "--resume", "no-such-sweep")


def test_a_missing_cluster_file(job, tmp_path):
    assert "--cluster" in job("sweep", "--config", DEMO, "--cluster", str(tmp_path / "nope.yaml"))


def copy_fashion_mnist(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("stem", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])
def test_a_truncated_split_fails_in_preflight_naming_the_file(job, tmp_path, fashion_mnist_root, stem):
    root = copy_fashion_mnist(fashion_mnist_root, tmp_path / "fm")
    path = root / f"{stem}.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[: len(data) - 100], compresslevel=1))  # level 9 takes 15 s
    err = job("sweep", "--config", DEMO, "--set", f"datasets.fashion_mnist.root={root}")
    assert err.count(f"{stem}.gz") == 1 and "truncated" in err and "expected layout" in err


def test_linear_eval_unknown_run(job):
    assert "no run 'f00'" in job("linear_eval", "--run-id", "f00")


def test_linear_eval_missing_checkpoint(job, tmp_path):
    assert "cannot read the checkpoint" in job("linear_eval", "--checkpoint", str(tmp_path / "none"), "--no-log")


def test_linear_eval_refuses_a_file_that_is_not_a_checkpoint(job, tmp_path):
    junk = tmp_path / "state.pt"
    junk.write_bytes(b"not a torch file")
    assert "is not an unmix-ray checkpoint" in job("linear_eval", "--checkpoint", str(junk), "--no-log")


class Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_linear_eval_never_runs_code_from_a_checkpoint(job, tmp_path, capsys):
    evil = tmp_path / "state.pt"
    torch.save({"model": Payload(), "epoch": 1, "trial": {}}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    err = job("linear_eval", "--checkpoint", str(evil), "--no-log")
    assert "is not an unmix-ray checkpoint" in err and "code ran" not in capsys.readouterr().out


def test_report_of_an_unknown_sweep(job):
    assert "no MLflow store" in job("report", "--sweep", "nosuch")


def test_the_command_line_itself_exits_2_without_a_traceback(tmp_path):
    """The same path as a user's shell: a real process, its exit status and its stderr."""
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/sweep.py"), "--config", DEMO, "--set",
                           "grid.prob=[0.5", "--set", "train.batch_size=3"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "not valid YAML" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()
