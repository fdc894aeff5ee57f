"""Train/validation split by spatial blocks: overlapping tiles never end up on both sides.

Windows are grouped into blocks of `block_tiles` x `block_tiles` strides; whole blocks go to validation.
Train windows that still share pixels with a validation window (the overlap at block borders) are dropped,
so no ground is seen in training and scored in validation.
"""

from __future__ import annotations

import numpy as np
from pipeline.rect import Rect


def block_ids(windows: list[Rect], block_px: int) -> list[tuple[int, int]]:
    return [(w.row0 // block_px, w.col0 // block_px) for w in windows]


def spatial_split(windows: list[Rect], block_px: int, val_fraction: float, seed: int) -> list[str]:
    """'train', 'val' or 'drop' for each window of one scene."""
    ids = block_ids(windows, block_px)
    blocks = sorted(set(ids))
    n_val = int(round(val_fraction * len(blocks)))
    if val_fraction > 0 and len(blocks) >= 2:
        n_val = min(max(n_val, 1), len(blocks) - 1)
    else:
        n_val = 0
    order = np.random.default_rng(seed).permutation(len(blocks))
    val_blocks = {blocks[i] for i in order[:n_val]}
    sides = ["val" if b in val_blocks else "train" for b in ids]
    val_boxes = np.array([w.tuple() for w, s in zip(windows, sides) if s == "val"], dtype=np.int64).reshape(-1, 4)
    for i, (w, side) in enumerate(zip(windows, sides)):
        if side != "train" or len(val_boxes) == 0:
            continue
        overlaps = ((np.minimum(val_boxes[:, 2], w.col1) > np.maximum(val_boxes[:, 0], w.col0))
                    & (np.minimum(val_boxes[:, 3], w.row1) > np.maximum(val_boxes[:, 1], w.row0)))
        if overlaps.any():
            sides[i] = "drop"
    return sides
