"""ImageNet pretraining views as MoCo v2 makes them: each view its own RandomResizedCrop of the whole
image (in the DataLoader workers), then the rest of the recipe on the device without a second crop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms.v2 import functional as TF

from unmix_ray.augment import BatchAugment
from unmix_ray.config import CONFIG_DIR, AugmentConfig, DatasetConfig, MethodConfig, MixtureConfig, build
from unmix_ray.data import image_loader
from unmix_ray.data.imagenet import LAYOUT, pretrain_views
from unmix_ray.data.images import decode_one, read_bytes
from unmix_ray.methods import build_method
from unmix_ray.models import NarrowResNet
from unmix_ray.step import Pretrainer
from unmix_ray.unmix import MixtureSampler

from .fixtures import write_fixture

CROP = 32


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> DatasetConfig:
    root = write_fixture("imagenet", tmp_path_factory.mktemp("imagenet"), 2, num_classes=4)
    data = yaml.safe_load((CONFIG_DIR / "datasets" / "imagenet.yaml").read_text())
    data.update(root=str(root), num_classes=4, image_size=64, crop_size=CROP, decode_workers=0)
    return build(DatasetConfig, data)


def _wide_image(cfg: DatasetConfig) -> torch.Tensor:
    for path in sorted((Path(cfg.root) / "train").rglob("*.JPEG")):
        img = decode_one(read_bytes(path, "imagenet", LAYOUT), path, "imagenet", LAYOUT)
        if img.shape[2] >= 1.5 * img.shape[1]:
            return img
    raise AssertionError("the fixture has no wide image")


def test_each_view_is_its_own_resized_crop_of_the_whole_image(imagenet):
    img = _wide_image(imagenet)
    h, w = img.shape[1:]
    torch.manual_seed(0)
    outside_centre = 0
    for _ in range(20):
        views, boxes = pretrain_views(img, CROP, (0.2, 1.0))
        assert views.shape == (2, 3, CROP, CROP) and views.dtype == torch.uint8
        assert boxes[0] != boxes[1]
        for view, (top, left, bh, bw) in zip(views, boxes, strict=True):
            assert 0 <= top and top + bh <= h and 0 <= left and left + bw <= w
            assert 0.2 * h * w * 0.9 <= bh * bw <= h * w  # the scale range, up to rounding of the box
            assert torch.equal(view, TF.resized_crop(img, top, left, bh, bw, [CROP, CROP], antialias=True))
            # Reaching past the centred h x h square: the box was drawn on the whole image.
            outside_centre += left < (w - h) // 2 or left + bw > (w + h) // 2
    assert outside_centre > 0


def test_the_streamed_loader_yields_view_pairs_cropped_with_the_dataset_scale(imagenet):
    cfg = imagenet.model_copy(update={"augment": AugmentConfig(crop_scale=(0.9, 1.0))})
    batches = image_loader(cfg, "train", 4, mode="pretrain", seed=0, workers=0)
    dataset = batches.loader.dataset
    assert dataset.crop_scale == (0.9, 1.0) and dataset.crop_ratio == tuple(cfg.augment.crop_ratio)
    got = list(batches)
    assert len(got) == 2
    for views, labels in got:
        assert views.shape == (4, 2, 3, CROP, CROP) and views.dtype == torch.uint8 and labels.shape == (4,)
        assert not torch.equal(views[:, 0], views[:, 1])
    # One item by the definition: two draws of the dataset's crop on the decoded image.
    path = Path(dataset.folder) / dataset.files[0].decode()
    img = decode_one(read_bytes(path, "imagenet", LAYOUT), path, "imagenet", LAYOUT)
    torch.manual_seed(3)
    item, _ = dataset[0]
    torch.manual_seed(3)
    expected, boxes = pretrain_views(img, CROP, (0.9, 1.0), cfg.augment.crop_ratio)
    assert torch.equal(item, expected)
    assert all(bh * bw >= 0.9 * 0.9 * img.shape[1] * img.shape[2] for _, _, bh, bw in boxes)
    # Evaluation still gets one centre crop per image.
    images, _ = next(iter(image_loader(cfg, "val", 4, mode="eval", workers=0)))
    assert images.shape == (4, 3, CROP, CROP)


def test_augment_without_crop_flips_and_keeps_the_pixels():
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (6, 3, CROP, CROP), dtype=torch.uint8, generator=g)
    plain = AugmentConfig(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    for flip_p, expected in ((0.0, views), (1.0, views.flip(-1))):
        aug = BatchAugment(plain.model_copy(update={"flip_p": flip_p}), CROP, mean, std, g)
        torch.testing.assert_close(aug(views, crop=False), (expected.float() / 255 - m) / s)
    full = BatchAugment(AugmentConfig(blur_p=0.5), CROP, mean, std, g)
    out = full(views, crop=False)
    assert out.shape == (6, 3, CROP, CROP) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="without cropping must be 32x32"):
        full(torch.zeros(2, 3, 40, 40, dtype=torch.uint8), crop=False)


class Recording:
    """A BatchAugment that records what it was asked to augment."""

    def __init__(self, augment: BatchAugment):
        self.augment, self.calls = augment, []

    def __call__(self, images: torch.Tensor, crop: bool = True) -> torch.Tensor:
        self.calls.append((tuple(images.shape), crop))
        return self.augment(images, crop)


def test_a_pretraining_epoch_runs_on_imagenet_view_pairs(imagenet):
    torch.manual_seed(0)
    method = build_method(MethodConfig(name="simclr", params={"proj_hidden": 16, "proj_dim": 8}),
                          NarrowResNet(3, 4))
    batches = image_loader(imagenet, "train", 4, mode="pretrain", seed=0, workers=0)
    opt = torch.optim.SGD(method.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, 1.0)
    augment = Recording(BatchAugment(imagenet.augment, CROP, imagenet.mean, imagenet.std,
                                     torch.Generator().manual_seed(0)))
    before = [p.detach().clone() for p in method.parameters()]
    loss = Pretrainer(method, method, opt, sched, augment).epoch(
        batches, MixtureSampler(MixtureConfig(type="cutmix"), 0), torch.device("cpu"))
    assert torch.isfinite(loss).all() and loss[2] > 0  # the mixed term ran
    assert augment.calls == [((4, 3, CROP, CROP), False)] * 4  # two batches, two views each, no second crop
    assert any(not torch.equal(a, b) for a, b in zip(before, method.parameters(), strict=True))
