"""Every loader on tiny files in its dataset's exact original format, and every kind of bad data.

Pixel layouts are checked against files built here byte by byte from the format's definition (not
only through the fixture writers, which share the loaders' reading of the format).
"""

from __future__ import annotations

import gzip
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.io import encode_jpeg

from unmix_ray.compose import compose_sweep, known_names
from unmix_ray.config import CONFIG_DIR, ConfigError, DatasetConfig, build
from unmix_ray.data import DatasetError, image_loader, load_pretrain, load_split
from unmix_ray.data.loader import shard_indices

from .fixtures import DATASETS, REAL_CLASSES, write_fixture

FASHION = Path("/usr/share/datasets/fashion-mnist")


def config(name: str, root: Path, **kw) -> DatasetConfig:
    data = yaml.safe_load((CONFIG_DIR / "datasets" / f"{name}.yaml").read_text())
    data.update(root=str(root), **kw)
    return build(DatasetConfig, data)


def pattern(c: int, h: int, w: int) -> np.ndarray:
    """An image whose every pixel says where it is: [c, y, x] -> distinct values."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(ch * 85 + y * 7 + x * 3) % 256 for ch in range(c)]).astype(np.uint8)


def assert_clear(err: DatasetError, dataset: str, path_part: str) -> None:
    text = str(err)
    assert text.startswith(f"{dataset}: "), text
    assert path_part in err.path, (path_part, err.path)
    assert "expected layout:" in text and err.layout.strip() in text


# ---- configs ----------------------------------------------------------------------------------------------

def test_every_dataset_config_composes_with_the_paper_settings():
    names = known_names("datasets")
    sweep = compose_sweep({"name": "t", "grid": {"dataset": names, "method": ["simclr"], "mixture": ["none"]},
                           "untrained_reference": False})
    got = {t.dataset.name: t.dataset for t in sweep.trials}
    assert set(got) == set(names) == set(DATASETS)
    expect = {"cifar10": (10, 32, 32, "test"), "cifar100": (100, 32, 32, "test"),
              "stl10": (10, 96, 64, "test"), "tiny_imagenet": (200, 64, 64, "val"),
              "imagenet": (1000, 256, 224, "val")}
    for name, (classes, image, crop, test) in expect.items():
        d = got[name]
        assert (d.num_classes, d.image_size, d.crop_size, d.test_split) == (classes, image, crop, test)
        assert d.augment.jitter == (0.4, 0.4, 0.4, 0.1) and d.augment.jitter_p == 0.8
        assert d.augment.crop_scale == (0.2, 1.0) and d.augment.gray_p == 0.2
    assert got["stl10"].pretrain_splits == ("train", "unlabeled")
    assert got["imagenet"].augment.blur_p == 0.5 and got["cifar10"].augment.blur_p == 0.0


def test_source_and_download_are_validated():
    base = yaml.safe_load((CONFIG_DIR / "datasets" / "imagenet.yaml").read_text())
    with pytest.raises(ConfigError) as e:
        build(DatasetConfig, base | {"source": "https://bucket/x", "download": True,
                                     "endpoint_url": "minio:9000"})
    text = str(e.value)
    assert "source: expected s3://" in text and "download: cannot be combined" in text
    assert "torchvision cannot download 'imagenet'" in text and "endpoint_url" in text


# ---- CIFAR ------------------------------------------------------------------------------------------------

def test_cifar10_pixel_layout_and_splits(tmp_path):
    root = write_fixture("cifar10", tmp_path, 3)
    d = root / "cifar-10-batches-py"
    img = pattern(3, 32, 32)
    with open(d / "test_batch", "wb") as f:  # as Python 2 pickled it: bytes keys, row = R | G | B planes
        pickle.dump({b"batch_label": b"testing batch 1 of 1", b"labels": [7],
                     b"data": img.reshape(1, 3072), b"filenames": [b"x.png"]}, f, protocol=2)
    test = DATASETS["cifar10"](root, "test")
    assert torch.equal(test.images[0], torch.from_numpy(img)) and test.labels.tolist() == [7]
    train = DATASETS["cifar10"](root, "train")
    assert train.images.shape == (30, 3, 32, 32) and train.images.dtype == torch.uint8
    assert sorted(train.labels.tolist()) == sorted(list(range(10)) * 3) and train.num_classes == 10
    # The folder itself works as root too.
    assert len(DATASETS["cifar10"](d, "train")) == 30


def test_cifar100_fine_labels(tmp_path):
    root = write_fixture("cifar100", tmp_path, 1)
    train = load_split(config("cifar100", root), "train")
    assert train.images.shape == (100, 3, 32, 32) and sorted(train.labels.tolist()) == list(range(100))


def test_cifar_bad_data(tmp_path):
    with pytest.raises(DatasetError) as e:
        DATASETS["cifar10"](tmp_path / "absent", "train")
    assert_clear(e.value, "cifar10", "absent")
    root = write_fixture("cifar10", tmp_path / "a", 1)
    d = root / "cifar-10-batches-py"
    (d / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="missing file") as e:
        DATASETS["cifar10"](root, "train")
    assert_clear(e.value, "cifar10", "data_batch_3")
    blob = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated") as e:
        DATASETS["cifar10"](root, "test")
    assert_clear(e.value, "cifar10", "test_batch")
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"expected uint8 \[N, 3072\]"):
        DATASETS["cifar10"](root, "test")
    with open(d / "test_batch", "wb") as f:  # a pickle that would run code is refused, not executed
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": Path("/")}, f, protocol=2)
    with pytest.raises(DatasetError, match="not allowed"):
        DATASETS["cifar10"](root, "test")
    nine = write_fixture("cifar10", tmp_path / "b", 1, num_classes=9)
    with pytest.raises(DatasetError, match="9 class names, expected 10") as e:
        DATASETS["cifar10"](nine, "train")
    assert_clear(e.value, "cifar10", "batches.meta")
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        DATASETS["cifar100"](write_fixture("cifar100", tmp_path / "c", 1), "val")


# ---- STL-10 -----------------------------------------------------------------------------------------------

def test_stl10_column_major_planes_and_unlabeled(tmp_path):
    root = write_fixture("stl10", tmp_path, 2)
    d = root / "stl10_binary"
    img = pattern(3, 96, 96)
    raw = np.zeros(3 * 96 * 96, np.uint8)
    for c in range(3):  # the format: byte c*9216 + x*96 + y holds pixel (c, y, x)
        for x in range(96):
            raw[c * 9216 + x * 96: c * 9216 + (x + 1) * 96] = img[c, :, x]
    (d / "test_X.bin").write_bytes(raw.tobytes())
    (d / "test_y.bin").write_bytes(bytes([10]))
    test = DATASETS["stl10"](root, "test")
    assert torch.equal(test.images[0], torch.from_numpy(img)) and test.labels.tolist() == [9]
    cfg = config("stl10", root)
    pre = load_pretrain(cfg, seed=0)
    assert pre.images.shape == (40, 3, 96, 96)
    assert (pre.labels == -1).sum() == 20 and sorted(pre.labels[pre.labels >= 0].tolist()) == sorted(
        list(range(10)) * 2)
    assert len(load_pretrain(cfg.model_copy(update={"train_subset": 8}), seed=0)) == 8


def test_stl10_bad_data(tmp_path):
    root = write_fixture("stl10", tmp_path, 1)
    d = root / "stl10_binary"
    blob = (d / "train_X.bin").read_bytes()
    (d / "train_X.bin").write_bytes(blob[:-100])
    with pytest.raises(DatasetError, match="not a whole number") as e:
        DATASETS["stl10"](root, "train")
    assert_clear(e.value, "stl10", "train_X.bin")
    (d / "train_X.bin").write_bytes(blob)
    (d / "train_y.bin").write_bytes(bytes([0] * 10))
    with pytest.raises(DatasetError, match=r"labels span 0\.\.0, expected 1\.\.10"):
        DATASETS["stl10"](root, "train")
    (d / "train_y.bin").write_bytes(bytes([1] * 9))
    with pytest.raises(DatasetError, match="9 labels for 10 images"):
        DATASETS["stl10"](root, "train")
    (d / "test_y.bin").unlink()
    with pytest.raises(DatasetError, match="missing file") as e:
        DATASETS["stl10"](root, "test")
    assert_clear(e.value, "stl10", "test_y.bin")
    (d / "class_names.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match="2 class names, expected 10"):
        DATASETS["stl10"](root, "unlabeled")


# ---- Tiny ImageNet ----------------------------------------------------------------------------------------

def test_tiny_imagenet_labels_follow_the_annotations(tmp_path):
    root = write_fixture("tiny_imagenet", tmp_path, 3, num_classes=4)
    cfg = config("tiny_imagenet", root, num_classes=4)
    train, val = load_split(cfg, "train"), load_split(cfg, cfg.test_split)
    assert train.images.shape == (12, 3, 64, 64) and val.images.shape == (12, 3, 64, 64)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # Each class has its own colour: a val image is nearest to its own class's train mean.
    means = torch.stack([train.images[train.labels == c].float().mean((0, 2, 3)) for c in range(4)])
    nearest = torch.cdist(val.images.float().mean((2, 3)), means).argmin(1)
    assert torch.equal(nearest, val.labels)
    # Decoded once: the arrays are cached, and an edited file invalidates the cache.
    cache = root / "tiny-imagenet-200" / ".unmix_cache"
    assert len(list(cache.glob("tiny_imagenet-train-*.images.npy"))) == 1
    again = load_split(cfg, "train")
    assert torch.equal(again.images, train.images)
    first = sorted((root / "tiny-imagenet-200" / "train").glob("*/images/*.JPEG"))[0]
    first.write_bytes(encode_jpeg(torch.zeros(3, 64, 64, dtype=torch.uint8)).numpy().tobytes())
    assert load_split(cfg, "train").images[0].float().mean() < 5


def test_tiny_imagenet_bad_data(tmp_path):
    root = write_fixture("tiny_imagenet", tmp_path, 1, num_classes=3)
    d = root / "tiny-imagenet-200"
    with pytest.raises(DatasetError, match="has 3 classes and 3 channels; the config says 200") as e:
        load_split(config("tiny_imagenet", root), "val")  # the real config expects 200 classes
    assert_clear(e.value, "tiny_imagenet", str(root))
    with pytest.raises(DatasetError, match="no labels; evaluate on val"):
        DATASETS["tiny_imagenet"](root, "test")
    img = sorted((d / "val" / "images").iterdir())[0]
    img.write_bytes(encode_jpeg(torch.zeros(3, 32, 32, dtype=torch.uint8)).numpy().tobytes())
    with pytest.raises(DatasetError, match="image is 32x32, expected 64x64") as e:
        DATASETS["tiny_imagenet"](root, "val")
    assert_clear(e.value, "tiny_imagenet", img.name)
    blob = encode_jpeg(torch.zeros(3, 64, 64, dtype=torch.uint8)).numpy().tobytes()
    img.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="truncated") as e:
        DATASETS["tiny_imagenet"](root, "val")
    assert_clear(e.value, "tiny_imagenet", img.name)
    ann = d / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_99.JPEG\tn00000001\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="class 'n00000001' is not in wnids.txt"):
        DATASETS["tiny_imagenet"](root, "val")
    ann.unlink()
    with pytest.raises(DatasetError, match="missing file") as e:
        DATASETS["tiny_imagenet"](root, "val")
    assert_clear(e.value, "tiny_imagenet", "val_annotations.txt")
    wnid = sorted((d / "train").iterdir())[0]
    for f in (wnid / "images").iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match="no JPEGs for class"):
        DATASETS["tiny_imagenet"](root, "train")


# ---- ImageNet ---------------------------------------------------------------------------------------------

@pytest.fixture()
def imagenet_root(tmp_path):
    return write_fixture("imagenet", tmp_path / "imagenet", 3, num_classes=4)


def test_imagenet_in_memory_for_small_sets(imagenet_root):
    cfg = config("imagenet", imagenet_root, num_classes=4, image_size=64, crop_size=56)
    val = load_split(cfg, "val")  # includes a greyscale JPEG and a PNG named .JPEG in train
    train = load_split(cfg, "train")
    assert val.images.shape == (12, 3, 64, 64) and train.images.shape == (12, 3, 64, 64)
    assert val.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and val.num_classes == 4
    with pytest.raises(DatasetError, match="more than 5 to hold in memory"):
        DATASETS["imagenet"](imagenet_root, "train", max_images=5)


@pytest.mark.parametrize("mode, shape", [("pretrain", (2, 3, 56, 56)), ("train", (3, 56, 56)), ("eval", (3, 56, 56))])
def test_imagenet_streams_uint8_batches(imagenet_root, mode, shape):
    cfg = config("imagenet", imagenet_root, num_classes=4, image_size=64, crop_size=56)
    batches = image_loader(cfg, "train", 5, mode=mode, seed=1, workers=0)
    got = list(batches)
    # 12 images in batches of 5: evaluation keeps the last, partial batch (5, 5, 2); the training modes
    # drop it (drop_last: Un-Mix needs full, even batches), keeping 10 of the 12 images.
    assert len(got) == len(batches) == (3 if mode == "eval" else 2)
    assert [len(labels) for _, labels in got] == ([5, 5, 2] if mode == "eval" else [5, 5])
    for images, labels in got:  # pretrain: two views per image, each cropped from the whole image
        assert images.dtype == torch.uint8 and images.shape[1:] == shape
        assert labels.dtype == torch.int64
    seen = torch.cat([labels for _, labels in got]).tolist()
    every = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    if mode == "eval":
        assert seen == every  # in order, nothing dropped
    else:
        assert not Counter(seen) - Counter(every)  # 10 of the 12: no class more often than it has images


def test_imagenet_stream_in_worker_processes_is_sharded(imagenet_root):
    cfg = config("imagenet", imagenet_root, num_classes=4, image_size=48, crop_size=40)
    labels = []
    for rank in range(2):  # rank 0 decodes in a worker process, rank 1 in this one
        loader = image_loader(cfg, ["train", "val"], 3, mode="pretrain", seed=0, rank=rank, world_size=2,
                              workers=1 - rank)
        loader.set_epoch(1)
        batches = list(loader)
        assert len(batches) == len(loader) == 4
        labels.append(torch.cat([b[1] for b in batches]))
    assert sorted(torch.cat(labels).tolist()) == sorted([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] * 2)


def test_imagenet_bad_data(tmp_path, imagenet_root):
    flat = tmp_path / "flat"
    write_fixture("imagenet", flat, 1, num_classes=2)
    for f in list((flat / "val").rglob("*.JPEG")):
        f.rename(flat / "val" / f.name)
    with pytest.raises(DatasetError, match="images directly in val/") as e:
        DATASETS["imagenet"](flat, "val")
    assert_clear(e.value, "imagenet", "val")
    odd = imagenet_root / "val" / "n99999999"
    odd.mkdir()
    (odd / "x.JPEG").write_bytes(encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8)).numpy().tobytes())
    with pytest.raises(DatasetError, match="not among the train classes"):
        DATASETS["imagenet"](imagenet_root, "val")
    with pytest.raises(DatasetError, match="has 4 classes"):
        image_loader(config("imagenet", imagenet_root), "train", 4, workers=0)
    with pytest.raises(DatasetError, match="data root not found"):
        DATASETS["imagenet"](tmp_path / "nothing", "train")


# ---- in-memory batches ------------------------------------------------------------------------------------

def test_memory_batches_shard_and_reshuffle(tmp_path):
    cfg = config("cifar10", write_fixture("cifar10", tmp_path, 5))
    a = image_loader(cfg, "train", 8, mode="pretrain", seed=3, rank=0, world_size=2)
    b = image_loader(cfg, "train", 8, mode="pretrain", seed=3, rank=1, world_size=2)
    assert len(a) == len(b) == 3  # 25 per rank, even batches of 8, the rest dropped
    first = [x for x, _ in a]
    assert all(x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 for x in first)
    a.set_epoch(1)
    assert not torch.equal(torch.cat(first), torch.cat([x for x, _ in a]))
    idx0 = shard_indices(50, 0, 2, 3, 0, True, True)
    idx1 = shard_indices(50, 1, 2, 3, 0, True, True)
    assert len(set(idx0) | set(idx1)) == 50 and not set(idx0) & set(idx1)
    ev = image_loader(cfg, "test", 16, mode="eval")
    assert [len(y) for _, y in ev] == [16, 16, 16, 2]


# ---- Fashion-MNIST ----------------------------------------------------------------------------------------

@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason=f"Fashion-MNIST is not installed at {FASHION} "
                    "(apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_real_files():
    cfg = config("fashion_mnist", FASHION)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_fashion_mnist_fixture_and_truncation(tmp_path):
    root = write_fixture("fashion_mnist", tmp_path, 2)
    assert DATASETS["fashion_mnist"](root, "test").images.shape == (20, 1, 28, 28)
    path = root / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-50]))
    with pytest.raises(DatasetError, match="truncated") as e:
        DATASETS["fashion_mnist"](root, "test")
    assert_clear(e.value, "fashion_mnist", "t10k-images")


def test_fixture_writer_api(tmp_path):
    for name in REAL_CLASSES:
        assert name in DATASETS
    with pytest.raises(ValueError, match="unknown dataset"):
        write_fixture("mnist", tmp_path)
    root = write_fixture("cifar100", tmp_path / "c100", 1)
    assert load_split(config("cifar100", root), "test").num_classes == 100  # real class count by default


def test_download_flag_uses_torchvision_once_and_fails_clearly(tmp_path, monkeypatch):
    import torchvision

    from unmix_ray.data import prepare

    calls = []

    def fake_cifar10(root, train, download):  # what torchvision leaves behind: cifar-10-batches-py/
        calls.append(train)
        write_fixture("cifar10", root, 1)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    cfg = config("cifar10", tmp_path / "dl", download=True)
    assert len(load_split(cfg, "test")) == 10 and calls == [True, False]
    prepare(cfg)
    assert calls == [True, False]  # present now: not fetched again

    def offline(root, train, download):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(DatasetError, match="torchvision download failed") as e:
        load_split(config("cifar100", tmp_path / "none", download=True), "train")
    assert_clear(e.value, "cifar100", "none")
