"""In-memory image sets: uint8 [N, C, H, W] tensors with int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    num_classes: int

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, n: int | None, seed: int) -> ImageSet:
        """A seeded random subset of ``n`` samples (the whole set when n is None or >= len)."""
        if n is None or n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageSet(self.images[idx], self.labels[idx], self.num_classes)

    @staticmethod
    def concat(parts: list[ImageSet]) -> ImageSet:
        return ImageSet(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
                        parts[0].num_classes)
