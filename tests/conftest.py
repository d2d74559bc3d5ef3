from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

torch.set_num_threads(1)

# Set by .ci/run: a service, a tool or a browser a test needs must be there, so its absence fails the
# run instead of skipping the test and leaving CI green.
REQUIRE_SERVICES = os.environ.get("UNMIX_REQUIRE_SERVICES") == "1"


def missing(what: str) -> None:
    """Skip the test for want of ``what``, or fail it where everything is required (CI)."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} (UNMIX_REQUIRE_SERVICES=1: CI must provide it)")
    pytest.skip(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fashion_mnist_root() -> Path:
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"Fashion-MNIST not found under {FASHION_MNIST}: apt-get install dataset-fashion-mnist "
                    "(.ci/run and `make setup` do this)")
    return FASHION_MNIST


SMALL_FASHION_MNIST = {"train": 2000, "test": 500}


def write_idx(path: Path, array) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="session")
def small_fashion_mnist(tmp_path_factory, fashion_mnist_root) -> Path:
    """The first images of the real Fashion-MNIST, written back in its own idx format: what end-to-end
    tests train and evaluate on (the full splits would make every final evaluation encode 70,000 images)."""
    from unmix_ray.data import fashion_mnist

    root = tmp_path_factory.mktemp("fmnist")
    for split, n in SMALL_FASHION_MNIST.items():
        data = fashion_mnist.load(fashion_mnist_root, split)
        images, labels = fashion_mnist.FILES[split][:2]
        write_idx(root / f"{images}.gz", data.images[:n, 0].numpy())
        write_idx(root / f"{labels}.gz", data.labels[:n].numpy().astype("uint8"))
    return root


# One embedded Ray shared by every test that asks for `ray_local`: they run one after another (the
# collection hook below puts them together) and it stops before any test that starts a Ray of its own
# (only one Ray at a time on a machine: see README, Development).
_shared_ray: dict[str, bool] = {"up": False}


@pytest.fixture
def ray_local():
    """An embedded local Ray (2 CPUs, plus trial-driver slots), started as the sweeps start theirs: on
    loopback, and isolated from any other Ray on this machine."""
    import ray

    from unmix_ray.orchestration.local_ray import start_local

    if not _shared_ray["up"]:
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        start_local(num_cpus=2, resources={"trial_driver": 8}, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        _shared_ray["up"] = True
    return ray


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts Ray is slow too; the tests on the shared Ray are moved together where the first
    of them is: one Ray start for all."""
    for item in items:
        if item.get_closest_marker("ray") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
    shared = [item for item in items if "ray_local" in getattr(item, "fixturenames", ())]
    if shared:
        first = items.index(shared[0])
        rest = [item for item in items if item not in shared]
        items[:] = rest[:first] + shared + rest[first:]


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _shared_ray["up"] and (nextitem is None or "ray_local" not in getattr(nextitem, "fixturenames", ())):
        from unmix_ray.orchestration.local_ray import stop_local

        stop_local()
        _shared_ray["up"] = False


# The cluster files as parsed YAML, for the cluster tests.
@pytest.fixture(scope="module")
def aws() -> dict:
    from .cluster_files import load_aws

    return load_aws()


@pytest.fixture(scope="module")
def kuberay() -> list[dict]:
    from .cluster_files import load_kuberay

    return load_kuberay()


@pytest.fixture(scope="module")
def paper_yaml() -> dict:
    from .cluster_files import load_paper

    return load_paper()
