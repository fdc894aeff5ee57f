"""Optimizer and learning-rate schedule from the config.

Weight decay is off for normalization layers (chosen by module type), biases, and Swin's relative-position
bias tables: decaying them towards zero fights the normalization / position prior they encode.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)


def no_decay_parameter_ids(model: nn.Module) -> set[int]:
    """ids of trainable parameters that must not be weight-decayed."""
    ids: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if (
                isinstance(module, NORM_TYPES)
                or name == "bias"
                or (isinstance(module, ShiftedWindowAttention) and name == "relative_position_bias_table")
            ):
                ids.add(id(param))
    return ids


def scaled_lr(config: dict[str, Any], global_batch: int) -> float:
    """Linear scaling rule (Goyal et al., 2017): `optimizer.lr` is the rate for `train.batch_size` images per
    step; a step over k times as many images (more workers or a bigger batch) takes a k times larger step."""
    return float(config["optimizer"]["lr"]) * int(global_batch) / int(config["train"]["batch_size"])


def build_optimizer(model: nn.Module, config: dict[str, Any], global_batch: int | None = None) -> torch.optim.Optimizer:
    """`global_batch`: images per optimizer step over all workers (default: the config's train.batch_size)."""
    o = config["optimizer"]
    lr = scaled_lr(config, global_batch or int(config["train"]["batch_size"]))
    skip = no_decay_parameter_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) not in skip], "weight_decay": float(o["weight_decay"])},
        {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0},
    ]
    if o["name"] == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(o["momentum"]))
    return torch.optim.AdamW(groups, lr=lr)


def lr_factor(iteration: int, total_iters: int, schedule: dict[str, Any]) -> float:
    """Linear warm-up from `warmup_factor` to 1, then x gamma at each milestone (fractions of the run)."""
    warmup = min(int(schedule["warmup_iters"]), max(total_iters - 1, 0))
    factor = 1.0
    if iteration < warmup:
        alpha = iteration / warmup
        factor = float(schedule["warmup_factor"]) * (1 - alpha) + alpha
    steps = [int(f * total_iters) for f in schedule["milestones"]]
    return factor * float(schedule["gamma"]) ** bisect.bisect_right(steps, iteration)


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: dict[str, Any], total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration; its state dict goes into the checkpoint so `--resume` continues it."""
    schedule = dict(config["schedule"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, total_iters, schedule))
