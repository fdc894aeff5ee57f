"""The model step as a picklable predictor: list of C x H x W float tensors in [0, 1] -> detections in the
compact form (README, "Pluggable model step").

Any callable with that contract (and an optional `class_names`) can replace the checkpoint model in
`run_scene`; this module holds the one built from a checkpoint file. It runs torchvision's Mask R-CNN eval
path step by step (as `GeneralizedRCNN.forward` and `RoIHeads.forward` do) with two changes that leave the
detections it keeps unchanged:
- masks are computed only for detections at or above the run's score threshold (the mask head is the
  largest part of the RoI stage; the scores under it are returned as `dropped_scores`);
- each mask is pasted into its own box only, thresholded and cropped where the model runs (on the GPU with
  `--device cuda`), instead of into a float mask of the whole tile per detection that is copied to the host
  (57 MB for 55 objects on a 512 px tile). Only boxes, scores, labels and cropped boolean masks cross over.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import UserError
from model.checkpoint import load_checkpoint, read_checkpoint_header
from pipeline.settings import PRECISIONS

if TYPE_CHECKING:  # torch is imported where the model runs (Ray workers), not by the driver
    import torch


class CheckpointPredictor:
    """Loads the checkpoint lazily, once per process (Ray actor), so pickling it ships only the path.

    `precision` (CUDA only): `auto` keeps the checkpoint's own setting (`model.amp`: the backbone in float16
    autocast), `float32` runs everything in float32, `float16`/`bfloat16` autocast the whole forward.
    """

    def __init__(self, checkpoint: str, device: str = "cpu", score_threshold: float = 0.0,
                 mask_threshold: float = 0.5, precision: str = "auto"):
        payload = read_checkpoint_header(checkpoint)  # fail fast in the driver, with a one-line error
        if precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if device != "cuda" and precision not in ("auto", "float32"):
            raise UserError(f"precision {precision} needs --device cuda (autocast runs on the GPU only)")
        # Ray actors may run in another working directory (on a cluster, always): keep an absolute path.
        self.checkpoint = os.path.abspath(checkpoint)
        self.device = device
        self.score_threshold = float(score_threshold)
        self.mask_threshold = float(mask_threshold)
        self.precision = precision
        self.class_names: list[str] = list(payload["class_names"])
        self.config: dict[str, Any] = payload["config"]
        self._model: torch.nn.Module | None = None  # loaded by the process that runs it

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    def load(self) -> torch.nn.Module:
        if self._model is None:
            import torch

            model, _ = load_checkpoint(self.checkpoint)
            if self.precision != "auto" and hasattr(model.backbone, "amp"):
                model.backbone.amp = False  # the whole forward's autocast (or none) decides, not the backbone's
            # NHWC: oneDNN's convolutions run faster in it on the CPU (Swin-T Mask R-CNN 9 %, ResNet-50 18 %),
            # as do cuDNN's in mixed precision; outputs move only by float rounding.
            self._model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        return self._model

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        import torch

        model = self.load()
        cuda = self.device == "cuda"
        # Pinned host memory lets the copy to the GPU run asynchronously, overlapping the previous batch.
        images = [(image.pin_memory() if cuda else image).to(self.device, non_blocking=cuda) for image in images]
        dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(self.precision)
        autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            outputs = detect(model, images, self.score_threshold, self.mask_threshold)
        return [to_host(out) for out in outputs]


def detect(model: torch.nn.Module, images: list[torch.Tensor], score_threshold: float,
           mask_threshold: float) -> list[dict[str, Any]]:
    """torchvision's Mask R-CNN eval forward, step by step, with masks only for the detections kept and
    pasted compactly (see the module docstring). Outputs stay on the model's device."""
    from torchvision.models.detection.roi_heads import maskrcnn_inference
    from torchvision.models.detection.transform import resize_boxes

    original_sizes = [tuple(image.shape[-2:]) for image in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    proposals, _ = model.rpn(batch, features)
    heads = model.roi_heads
    box_features = heads.box_head(heads.box_roi_pool(features, proposals, batch.image_sizes))
    class_logits, box_regression = heads.box_predictor(box_features)
    boxes, scores, labels = heads.postprocess_detections(class_logits, box_regression, proposals, batch.image_sizes)
    # NMS only lets a higher score suppress a lower one and the top-k cut keeps the highest scores, so the
    # detections at or above the threshold are exactly those the model would give with that threshold.
    keep = [s >= score_threshold for s in scores]
    dropped = [s[~k] for s, k in zip(scores, keep)]
    boxes, scores, labels = ([v[k] for v, k in zip(values, keep)] for values in (boxes, scores, labels))
    mask_features = heads.mask_head(heads.mask_roi_pool(features, boxes, batch.image_sizes))
    probabilities = maskrcnn_inference(heads.mask_predictor(mask_features), labels)
    outputs = []
    for b, s, l, p, d, size, original in zip(boxes, scores, labels, probabilities, dropped, batch.image_sizes,
                                             original_sizes):
        b = resize_boxes(b, size, original)
        mask_boxes, crops = paste_in_boxes(p, b, original, mask_threshold)
        outputs.append({"boxes": b, "scores": s, "labels": l, "mask_boxes": mask_boxes, "mask_crops": crops,
                        "dropped_scores": d})
    return outputs


def paste_in_boxes(masks: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int],
                   threshold: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each N x 1 x M x M mask probability pasted into its own box only, clipped to the image and thresholded:
    the same pixels as torchvision's `paste_masks_in_image` thresholded, without the tile-sized canvas.
    Returns the crops' boxes (N x 4 x0, y0, x1, y1, end exclusive, on the CPU) and the boolean crops."""
    import torch
    import torch.nn.functional as F
    from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

    masks, scale = expand_masks(masks, padding=1)
    expanded = expand_boxes(boxes, scale).to(dtype=torch.int64).tolist()  # one device sync for all boxes
    height, width = image_size
    crops, placed = [], []
    for mask, (bx0, by0, bx1, by1) in zip(masks, expanded):
        w, h = max(bx1 - bx0 + 1, 1), max(by1 - by0 + 1, 1)
        resized = F.interpolate(mask[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        x0, x1, y0, y1 = max(bx0, 0), min(bx1 + 1, width), max(by0, 0), min(by1 + 1, height)
        x1, y1 = max(x1, x0), max(y1, y0)
        crops.append(resized[y0 - by0:y1 - by0, x0 - bx0:x1 - bx0] >= threshold)
        placed.append((x0, y0, x1, y1))
    return torch.tensor(placed, dtype=torch.int64).reshape(-1, 4), crops


def to_host(output: dict[str, Any]) -> dict[str, Any]:
    """The compact output on the host: the crops travel as one flat buffer, a single copy per tile."""
    import torch

    crops = output.pop("mask_crops")
    flat = torch.cat([c.reshape(-1) for c in crops]) if crops else torch.zeros(0, dtype=torch.bool)
    flat = flat.cpu().numpy()
    ends = np.cumsum([c.numel() for c in crops]).tolist()
    starts = [0, *ends[:-1]]
    host = {k: v.cpu() for k, v in output.items()}
    host["mask_crops"] = [flat[a:b].reshape(tuple(c.shape)) for a, b, c in zip(starts, ends, crops)]
    return host
