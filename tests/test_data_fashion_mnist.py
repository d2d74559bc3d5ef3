"""The Fashion-MNIST loader on Debian's real files, and its errors on bad ones."""

from __future__ import annotations

import gzip
import shutil

import pytest
import torch

from unmix_ray.data import DatasetError, fashion_mnist


def test_real_files_load(fashion_mnist_root):
    train = fashion_mnist.load(fashion_mnist_root, "train")
    test = fashion_mnist.load(fashion_mnist_root, "test")
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]  # the published first labels


def test_missing_root_and_file_name_the_path_and_layout(tmp_path, fashion_mnist_root):
    with pytest.raises(DatasetError, match="data root not found") as e:
        fashion_mnist.load(tmp_path / "nope", "train")
    assert "t10k-images-idx3-ubyte" in str(e.value)  # the expected layout is spelled out
    shutil.copy(fashion_mnist_root / "train-images-idx3-ubyte.gz", tmp_path)
    with pytest.raises(DatasetError, match="missing file") as e:
        fashion_mnist.load(tmp_path, "train")
    assert str(tmp_path / "train-labels-idx1-ubyte.gz") in str(e.value)


def test_truncated_file_is_reported(tmp_path, fashion_mnist_root):
    with gzip.open(fashion_mnist_root / "t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[: len(raw) // 2])
    shutil.copy(fashion_mnist_root / "t10k-labels-idx1-ubyte.gz", tmp_path)
    with pytest.raises(DatasetError, match="truncated"):
        fashion_mnist.load(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"garbage!")
    with pytest.raises(DatasetError, match="bad header"):
        fashion_mnist.load(tmp_path, "test")


def test_dataset_errors_survive_pickling_with_their_message(tmp_path):
    import pickle

    with pytest.raises(DatasetError) as e:
        fashion_mnist.load(tmp_path / "nope", "train")
    again = pickle.loads(pickle.dumps(e.value))  # as when a Ray worker reports it
    assert str(again) == str(e.value) and again.path == e.value.path
