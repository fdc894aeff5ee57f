"""Model/training configuration: YAML files in `configs/` merged over these defaults.

Configs are plain nested dicts (so a checkpoint stores them and loads with `weights_only=True`). Unknown keys
are refused, because a misspelt key silently falling back to a default is the worst kind of config bug.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from model.errors import UserError

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


def merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge `update` over a copy of `base`, refusing keys `base` does not have."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f"{where}.{key}" if where else key
        if key not in base:
            known = ", ".join(sorted(base))
            raise UserError(f"unknown config key '{path}' (known here: {known})")
        if isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = merge(base[key], value, path)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def layered(defaults: dict[str, Any], path: str | Path | None, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """defaults <- YAML file <- overrides; an unknown key in the file is reported with the file's name."""
    config = defaults
    if path is not None:
        data = read_yaml(path)
        try:
            config = merge(config, data)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    return merge(config, overrides or {})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model config: defaults <- YAML file <- overrides, then validated."""
    config = layered(DEFAULTS, path, overrides)
    validate(config)
    return config


def validate(config: dict[str, Any]) -> None:
    """Refuse configs that would only fail later, deep inside torchvision."""
    backbone = config["model"]["backbone"]
    if backbone["name"] not in BACKBONES:
        raise UserError(f"model.backbone.name '{backbone['name']}' is not one of {', '.join(BACKBONES)}")
    if not 0 <= int(backbone["trainable_stages"]) <= 4:
        raise UserError("model.backbone.trainable_stages must be between 0 and 4")
    if not 0.0 <= float(backbone["drop_path_rate"]) < 1.0:
        raise UserError("model.backbone.drop_path_rate must be in [0, 1)")
    m = config["model"]
    if (m["min_size"] is None) != (m["max_size"] is None):
        raise UserError("model.min_size and model.max_size must both be set or both be null")
    classes = config["classes"]
    if classes is not None:
        if not classes or not all(isinstance(c, str) and c for c in classes):
            raise UserError("classes must be a non-empty list of names")
        if len(set(classes)) != len(classes):
            raise UserError(f"classes has duplicate names: {classes}")
    if config["optimizer"]["name"] not in ("adamw", "sgd"):
        raise UserError(f"optimizer.name '{config['optimizer']['name']}' is not one of adamw, sgd")
    if float(config["optimizer"]["lr"]) <= 0:
        raise UserError("optimizer.lr must be positive")
    if int(config["train"]["batch_size"]) < 1:
        raise UserError("train.batch_size must be at least 1 (the batch optimizer.lr is meant for)")
    if sorted(config["schedule"]["milestones"]) != list(config["schedule"]["milestones"]) or not all(
        0 < float(f) < 1 for f in config["schedule"]["milestones"]
    ):
        raise UserError("schedule.milestones must be increasing fractions of the run in (0, 1)")
