"""One builder: config -> torchvision MaskRCNN with a Swin or ResNet-50 FPN backbone."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from model.backbones import build_backbone
from core.errors import UserError


class NativeSizeTransform(GeneralizedRCNNTransform):
    """Normalize and batch without resizing: aerial tiles have a fixed ground resolution, and upscaling a
    512 px tile to 800 px only costs time and shifts object sizes away from the anchors."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        return image, target


def start_masks_undecided(model: MaskRCNN) -> None:
    """Mask logits start near 0 (N(0, 0.001), as Detectron2 does), so the first mask loss is ln 2.

    torchvision draws the 1x1 logit layer like the convolutions before it (Kaiming, fan-out), which makes
    the first mask loss several times ln 2 (on a test tile: 4.2 with ResNet-50, 8.0 with Swin-T, random
    weights): the first steps, and Adam's moments, go to undoing that."""
    logits = model.roi_heads.mask_predictor.mask_fcn_logits
    torch.nn.init.normal_(logits.weight, std=0.001)
    torch.nn.init.zeros_(logits.bias)


def build_model(config: dict[str, Any], num_classes: int | None = None, load_weights: bool = True) -> MaskRCNN:
    """Mask R-CNN for `config`; `num_classes` counts object classes (background is added here)."""
    m = config["model"]
    if num_classes is None:
        if not config["classes"]:
            raise UserError("the config has no classes: set `classes:` or train on data that defines them")
        num_classes = len(config["classes"])
    backbone = build_backbone(config, load_weights)
    sizes = tuple(tuple(int(s) for s in level) for level in m["anchor_sizes"])
    if len(sizes) != backbone.num_maps:
        raise UserError(
            f"model.anchor_sizes has {len(sizes)} entries but the FPN gives {backbone.num_maps} feature maps: "
            "give one entry per map"
        )
    ratios = (tuple(float(r) for r in m["aspect_ratios"]),) * len(sizes)
    levels = [str(i) for i in range(backbone.num_maps - 1)]  # RoIAlign on the FPN levels, not on "pool"
    model = MaskRCNN(
        backbone,
        num_classes=num_classes + 1,
        rpn_anchor_generator=AnchorGenerator(sizes, ratios),
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        rpn_pre_nms_top_n_train=int(m["rpn_pre_nms_top_n_train"]),
        rpn_post_nms_top_n_train=int(m["rpn_post_nms_top_n_train"]),
        rpn_pre_nms_top_n_test=int(m["rpn_pre_nms_top_n_test"]),
        rpn_post_nms_top_n_test=int(m["rpn_post_nms_top_n_test"]),
        box_batch_size_per_image=int(m["box_batch_size_per_image"]),
        box_score_thresh=float(m["box_score_thresh"]),
        box_nms_thresh=float(m["box_nms_thresh"]),
        box_detections_per_img=int(m["box_detections_per_img"]),
        image_mean=list(m["image_mean"]),
        image_std=list(m["image_std"]),
    )
    start_masks_undecided(model)
    if m["min_size"] is None:
        model.transform = NativeSizeTransform(1, 1, list(m["image_mean"]), list(m["image_std"]))
    else:
        model.transform = GeneralizedRCNNTransform(
            int(m["min_size"]), int(m["max_size"]), list(m["image_mean"]), list(m["image_std"])
        )
    return model
