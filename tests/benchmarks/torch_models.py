"""The torch modules of the SAHI comparison, apart so that its `ours` process imports torch only when its
predictor is one of them (the run driver itself never needs torch)."""

from __future__ import annotations

import torch

from tests.benchmarks.common import BrightSquares


class BrightRegions(torch.nn.Module):
    """`common.BrightSquares` as a torch module, the form SAHI's torchvision wrapper runs."""

    def forward(self, images):
        return BrightSquares()(images)


class SahiRepresentable(torch.nn.Module):
    """The model, minus the detections SAHI cannot hold.

    SAHI raises `ValueError: Invalid segmentation mask.`, losing the whole run, when a kept detection's mask
    has no outline of 3 or more points: an empty mask, a pixel, a line. A model with random weights makes
    such masks, and so does any model when a tile's edge cuts an object a pixel from its end. Dropping them
    with SAHI's own test before SAHI sees them is what a SAHI user would have to do; the check counts in
    SAHI's time. The forward runs under `torch.inference_mode`, as ours does: SAHI's own torchvision wrapper
    leaves autograd on, which would cost it time and memory."""

    def __init__(self, model: torch.nn.Module, score_threshold: float, mask_threshold: float = 0.5):
        super().__init__()
        self.model, self.score_threshold, self.mask_threshold = model, score_threshold, mask_threshold
        for name in ("roi_heads", "transform"):  # what SAHI's wrapper looks at on a torchvision model
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def forward(self, images):
        from sahi.utils.cv import get_coco_segmentation_from_bool_mask

        with torch.inference_mode():
            outputs = self.model(images)
        for out in outputs:
            keep = [not (score > self.score_threshold)
                    or bool(get_coco_segmentation_from_bool_mask((mask[0] > self.mask_threshold).numpy()))
                    for score, mask in zip(out["scores"].tolist(), out["masks"])]
            keep = torch.tensor(keep, dtype=torch.bool)
            out.update({k: v[keep] for k, v in out.items()})
        return outputs
