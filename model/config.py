"""Model/training configuration: YAML files in `configs/` merged over these defaults.

Configs are plain nested dicts (so a checkpoint stores them and loads with `weights_only=True`). Unknown keys
are refused, because a misspelt key silently falling back to a default is the worst kind of config bug; and
so is every value of the wrong type (`MODEL_RULES`, `TRAINING_RULES`), which would otherwise fail as a
TypeError deep inside torchvision, hours into a run.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


from core.errors import UserError
from core.yaml_files import layered

BACKBONES = ("swin_t", "swin_s", "swin_b", "resnet50")

DEFAULTS: dict[str, Any] = {
    "classes": None,  # list of class names; None: taken from the training data's categories
    "model": {
        "backbone": {
            "name": "swin_t",
            "weights": None,  # imagenet (torchvision's, see model/backbones.py), a local path, or a file name in
                              # the torch hub cache; None: random init
            "drop_path_rate": 0.2,  # Swin stochastic depth (ignored by ResNet)
            "trainable_stages": 4,  # the last N of the four stages train; the stem trains only when N == 4
        },
        "fpn_channels": 256,
        "anchor_sizes": [[32], [64], [128], [256], [512]],  # one entry per FPN map (strides 4..64)
        "aspect_ratios": [0.5, 1.0, 2.0],
        "min_size": None,  # None: feed tiles at their own size (never upscale a 512 px tile to 800)
        "max_size": None,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        # RPN proposals kept before / after NMS, and RoIs sampled per image for the heads in training.
        # Lower values train faster on a CPU (RoIAlign's backward dominates there).
        "rpn_pre_nms_top_n_train": 2000,
        "rpn_post_nms_top_n_train": 2000,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 1000,
        "box_batch_size_per_image": 512,
        "box_score_thresh": 0.05,
        "box_nms_thresh": 0.5,
        "box_detections_per_img": 100,
        "amp": True,  # autocast the backbone on CUDA only; detection outputs stay float32
    },
    "optimizer": {
        "name": "adamw",  # adamw | sgd
        "lr": 1.0e-4,
        "weight_decay": 0.05,
        "momentum": 0.9,  # sgd only
    },
    "schedule": {
        "warmup_iters": 100,
        "warmup_factor": 0.001,
        "milestones": [0.75, 0.9],  # fractions of the total iterations where lr is multiplied by gamma
        "gamma": 0.1,
    },
    "train": {
        "batch_size": 2,
        "clip_grad_norm": 1.0,
        "num_workers": 0,
    },
}


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model config: defaults <- YAML file <- overrides, then validated (errors name the file)."""
    config = layered(DEFAULTS, path, overrides)
    try:
        validate(config)
    except UserError as exc:
        if path is None:
            raise
        raise UserError(f"{path}: {exc}") from None
    return config


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numbers(v: Any, count: int | None = None, check: Callable[[Any], bool] = _number) -> bool:
    return isinstance(v, list) and bool(v) and (count is None or len(v) == count) and all(check(x) for x in v)


Rule = tuple[Callable[[Any], bool], str]  # (accepts the value, what it must be)
POSITIVE_INT: Rule = (lambda v: _integer(v) and v >= 1, "an integer >= 1")
OPTIONAL_SIZE: Rule = (lambda v: v is None or (_integer(v) and v >= 1), "null or an integer >= 1 (pixels)")
FRACTION: Rule = (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")

# Everything that shapes the network: checked for training and for every checkpoint that is loaded.
MODEL_RULES: dict[str, Rule] = {
    "classes": (lambda v: v is None or (isinstance(v, list) and bool(v) and all(isinstance(c, str) and c for c in v)),
                "null or a non-empty list of class names"),
    "model.backbone.name": (lambda v: isinstance(v, str) and v in BACKBONES, f"one of {', '.join(BACKBONES)}"),
    "model.backbone.weights": (lambda v: v is None or (isinstance(v, str) and bool(v)),
                               "null, imagenet, or the path of a weights file"),
    "model.backbone.drop_path_rate": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.backbone.trainable_stages": (lambda v: _integer(v) and 0 <= v <= 4, "an integer from 0 to 4"),
    "model.fpn_channels": POSITIVE_INT,
    "model.anchor_sizes": (lambda v: isinstance(v, list) and bool(v) and all(
        _numbers(level, check=lambda s: _integer(s) and s >= 1) for level in v),
        "a list of one list of positive anchor sizes (pixels) per FPN map"),
    "model.aspect_ratios": (lambda v: _numbers(v, check=lambda r: _number(r) and r > 0),
                            "a non-empty list of numbers > 0"),
    "model.min_size": OPTIONAL_SIZE,
    "model.max_size": OPTIONAL_SIZE,
    "model.image_mean": (lambda v: _numbers(v, 3), "a list of 3 numbers (one per channel)"),
    "model.image_std": (lambda v: _numbers(v, 3, lambda x: _number(x) and x > 0),
                        "a list of 3 numbers > 0 (one per channel)"),
    "model.rpn_pre_nms_top_n_train": POSITIVE_INT,
    "model.rpn_post_nms_top_n_train": POSITIVE_INT,
    "model.rpn_pre_nms_top_n_test": POSITIVE_INT,
    "model.rpn_post_nms_top_n_test": POSITIVE_INT,
    "model.box_batch_size_per_image": POSITIVE_INT,
    "model.box_score_thresh": FRACTION,
    "model.box_nms_thresh": FRACTION,
    "model.box_detections_per_img": POSITIVE_INT,
    "model.amp": (lambda v: isinstance(v, bool), "true or false"),
}
# Only training reads these.
TRAINING_RULES: dict[str, Rule] = {
    "optimizer.name": (lambda v: v in ("adamw", "sgd"), "one of adamw, sgd"),
    "optimizer.lr": (lambda v: _number(v) and v > 0, "a number > 0"),
    "optimizer.weight_decay": (lambda v: _number(v) and v >= 0, "a number >= 0"),
    "optimizer.momentum": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "schedule.warmup_iters": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    "schedule.warmup_factor": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "schedule.milestones": (lambda v: isinstance(v, list) and all(_number(f) and 0 < f < 1 for f in v)
                            and sorted(v) == v, "a list of increasing fractions of the run in (0, 1)"),
    "schedule.gamma": (lambda v: _number(v) and v > 0, "a number > 0"),
    "train.batch_size": (POSITIVE_INT[0], "an integer >= 1 (the batch optimizer.lr is meant for)"),
    "train.clip_grad_norm": (lambda v: v is None or (_number(v) and v >= 0), "null or a number >= 0 (0: no clipping)"),
    "train.num_workers": (lambda v: _integer(v) and v >= 0, "an integer >= 0"),
}


def check_rules(config: dict[str, Any], rules: dict[str, Rule]) -> None:
    for key, (accepts, wanted) in rules.items():
        value: Any = config
        for part in key.split("."):
            value = value[part]
        if not accepts(value):
            raise UserError(f"'{key}' must be {wanted}, got {reprlib.repr(value)}{_text_number_hint(value)}")


def _text_number_hint(value: Any) -> str:
    """YAML 1.1 reads 1e-4 (no dot) as text, a trap for anyone writing a learning rate."""
    if not isinstance(value, str):
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    dotted = re.sub(r"^([-+]?\d+)([eE])", r"\1.0\2", value.strip())
    if dotted != value.strip():
        return f" (text: YAML reads {value} as a string; write {dotted})"
    return " (text: write the number without quotes)"


def validate_model(config: dict[str, Any]) -> None:
    """Refuse a network description that would only fail later, deep inside torchvision."""
    check_rules(config, MODEL_RULES)
    m = config["model"]
    if (m["min_size"] is None) != (m["max_size"] is None):
        raise UserError("model.min_size and model.max_size must both be set or both be null")
    classes = config["classes"]
    if classes is not None and len(set(classes)) != len(classes):
        raise UserError(f"classes has duplicate names: {classes}")


def validate(config: dict[str, Any]) -> None:
    """Refuse configs that would only fail later: every setting's type and range, the model's and training's."""
    validate_model(config)
    check_rules(config, TRAINING_RULES)
