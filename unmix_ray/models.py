"""Backbones (torchvision ResNets, with the CIFAR stem where the recipe asks for it) and MLP heads.

Every backbone maps images to a flat feature vector and exposes ``feature_dim``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def _cifar_stem(model: ResNet, in_channels: int) -> ResNet:
    # Small images: a 3x3 stride-1 stem and no max-pool keep the spatial resolution (Un-Mix/SimCLR CIFAR).
    model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _headless(model: ResNet) -> ResNet:
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def resnet18_cifar(in_channels: int = 3) -> nn.Module:
    """The paper's CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, 512-d features."""
    return _headless(_cifar_stem(resnet18(), in_channels))


def resnet18_small_maxpool(in_channels: int = 3) -> nn.Module:
    """The ResNet-18 of the SimCLR/BYOL harness outside CIFAR (STL-10, Tiny ImageNet at 64 px): the 3x3
    stride-1 stem, but the max-pool kept, so the residual stages see 32 px maps; 512-d features."""
    model = resnet18()
    model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
    return _headless(model)


def resnet18_bottleneck_cifar(in_channels: int = 3) -> nn.Module:
    """What the authors' SwAV CIFAR code builds as ``resnet18``: Bottleneck blocks in stages of
    [2, 2, 2, 2] (26 layers, 2048-d features), a 1-pixel zero pad before a 3x3 stride-1 stem (so a
    32 px image gives 34 px maps), no max-pool."""
    model = ResNet(Bottleneck, [2, 2, 2, 2])
    model.conv1 = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False))
    model.maxpool = nn.Identity()
    return _headless(model)


def resnet18_imagenet(in_channels: int = 3) -> nn.Module:
    model = resnet18()
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return _headless(model)


def resnet50_imagenet(in_channels: int = 3) -> nn.Module:
    model = resnet50()
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return _headless(model)


class NarrowResNet(nn.Module):
    """A cheap ResNet for tests and the CPU demo: torchvision BasicBlocks, one per stage, ``width``
    channels in the first stage, a stride-2 stem (28-32 px inputs become 14-16 px feature maps)."""

    def __init__(self, in_channels: int = 3, width: int = 16):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        layers, planes = [], width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or planes != w:
                down = nn.Sequential(nn.Conv2d(planes, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            layers.append(BasicBlock(planes, w, stride, down))
            planes = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "resnet18_cifar": resnet18_cifar,
    "resnet18_small_maxpool": resnet18_small_maxpool,
    "resnet18_bottleneck_cifar": resnet18_bottleneck_cifar,
    "resnet18": resnet18_imagenet,
    "resnet50": resnet50_imagenet,
    "resnet_narrow": NarrowResNet,
}


def build_backbone(name: str, in_channels: int) -> nn.Module:
    return BACKBONES[name](in_channels)


def mlp(dims: list[int], batch_norm: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Linear(-BN)-ReLU layers through ``dims``; the last layer is plain linear (optionally BN'd)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (batch_norm and (not last or last_bn))))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn:
            layers.append(nn.BatchNorm1d(b, affine=False))
    return nn.Sequential(*layers)
