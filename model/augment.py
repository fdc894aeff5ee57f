"""Aerial augmentations: flips and 90-degree rotations (an overhead view has no "up").

Each transform takes (image 3 x H x W, target, generator) and moves image and masks together; boxes are
recomputed from the moved masks, so they stay tight and exact.
"""

from __future__ import annotations

import torch

from model.dataset import masks_to_boxes


def apply(image: torch.Tensor, target: dict, fn) -> tuple[torch.Tensor, dict]:
    target = dict(target)
    target["masks"] = fn(target["masks"])
    target["boxes"] = masks_to_boxes(target["masks"])
    return fn(image), target


class AerialAugment:
    """Horizontal flip, vertical flip (each with probability p_flip) and a rotation by k x 90 degrees
    (k uniform in 0..3, with probability p_rotate); non-square tiles swap height and width."""

    def __init__(self, p_flip: float = 0.5, p_rotate: float = 0.75):
        self.p_flip, self.p_rotate = p_flip, p_rotate

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        draws = torch.rand(3, generator=generator)
        k = int(torch.randint(1, 4, (1,), generator=generator))
        if draws[0] < self.p_flip:
            image, target = apply(image, target, lambda t: t.flip(-1))
        if draws[1] < self.p_flip:
            image, target = apply(image, target, lambda t: t.flip(-2))
        if draws[2] < self.p_rotate:
            image, target = apply(image, target, lambda t: torch.rot90(t, k, dims=(-2, -1)))
        return image, target


def aerial_augmentations() -> AerialAugment:
    return AerialAugment()
