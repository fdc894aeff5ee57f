"""The model step as a picklable predictor: list of C x H x W float tensors in [0, 1] -> Mask R-CNN outputs.

Any callable with that contract (and an optional `class_names`) can replace the checkpoint model in
`run_scene`; this module holds the one built from a checkpoint file.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from model.checkpoint import load_checkpoint, read_checkpoint


class CheckpointPredictor:
    """Loads the checkpoint lazily, once per process (Ray actor), so pickling it ships only the path."""

    def __init__(self, checkpoint: str, device: str = "cpu"):
        payload = read_checkpoint(checkpoint)  # fail fast in the driver, with a one-line error
        # Ray actors may run in another working directory (on a cluster, always): keep an absolute path.
        self.checkpoint = os.path.abspath(checkpoint)
        self.device = device
        self.class_names: list[str] = list(payload["class_names"])
        self.config: dict[str, Any] = payload["config"]
        self._model: torch.nn.Module | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def load(self) -> torch.nn.Module:
        if self._model is None:
            model, _ = load_checkpoint(self.checkpoint)
            self._model = model.to(self.device).eval()
        return self._model

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        model = self.load()
        with torch.inference_mode():
            outputs = model([image.to(self.device, non_blocking=True) for image in images])
        return [{k: v.cpu() for k, v in out.items()} for out in outputs]
