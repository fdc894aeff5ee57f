"""The model step as a picklable predictor: list of C x H x W float tensors in [0, 1] -> Mask R-CNN outputs.

Any callable with that contract (and an optional `class_names`) can replace the checkpoint model in
`run_scene`; this module holds the one built from a checkpoint file.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from model.checkpoint import load_checkpoint, read_checkpoint_header

if TYPE_CHECKING:  # torch is imported where the model runs (Ray workers), not by the driver
    import torch


class CheckpointPredictor:
    """Loads the checkpoint lazily, once per process (Ray actor), so pickling it ships only the path."""

    def __init__(self, checkpoint: str, device: str = "cpu", score_threshold: float = 0.0):
        payload = read_checkpoint_header(checkpoint)  # fail fast in the driver, with a one-line error
        # Ray actors may run in another working directory (on a cluster, always): keep an absolute path.
        self.checkpoint = os.path.abspath(checkpoint)
        self.device = device
        self.score_threshold = float(score_threshold)
        self.class_names: list[str] = list(payload["class_names"])
        self.config: dict[str, Any] = payload["config"]
        self._model: torch.nn.Module | None = None  # loaded by the process that runs it

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def load(self) -> torch.nn.Module:
        if self._model is None:
            import torch

            model, _ = load_checkpoint(self.checkpoint)
            skip_masks_below(model, self.score_threshold)
            model = model.to(self.device).eval()
            if self.device == "cpu":
                # oneDNN's convolutions run faster in NHWC here (Swin-T Mask R-CNN 9 %, ResNet-50 18 %); the
                # outputs move only by the float rounding that changing the thread count also causes.
                model = model.to(memory_format=torch.channels_last)
            self._model = model
        return self._model

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        import torch

        model = self.load()
        with torch.inference_mode():
            outputs = model([image.to(self.device, non_blocking=True) for image in images])
        return [{k: v.cpu() for k, v in out.items()} for out in outputs]


def skip_masks_below(model: torch.nn.Module, score_threshold: float) -> None:
    """Let the model drop detections under the run's score threshold before its mask head, not after.

    torchvision keeps up to 100 detections per image above `roi_heads.score_thresh` (0.05) and computes a mask
    for each; the mask head is the largest part of the RoI stage, and a run discards every detection under
    its threshold anyway. Raising `score_thresh` leaves the detections at or above the threshold unchanged:
    NMS only lets higher-scored boxes suppress lower ones, and the top-100 cut keeps the highest scores.
    torchvision keeps `score > score_thresh` while a run keeps `score >= threshold`, so the float32 just
    below the threshold is used.
    """
    heads = getattr(model, "roi_heads", None)
    if heads is None or score_threshold <= 0:
        return
    below = float(np.nextafter(np.float32(score_threshold), np.float32(0)))
    heads.score_thresh = max(float(heads.score_thresh), below)
