"""Window planning: full-size tiles with overlap, edge windows shifted inward.

Every window is `tile` x `tile`, so the model always sees the same input size. When the scene is smaller
than a tile along an axis, the single window on that axis starts at 0 and extends past the scene; reads
pad it, and `valid_region` tells padding from image so padding never yields objects.
"""

from __future__ import annotations

import numpy as np
from rasterio.windows import Window


def axis_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride tile - overlap from 0, the last one ending exactly at `length`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    offsets = list(range(0, length - tile, stride))
    offsets.append(length - tile)
    return offsets


def plan_windows(width: int, height: int, tile: int, overlap: int) -> list[Window]:
    """Row-major list of tile x tile windows covering a width x height scene."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    return [
        Window(col, row, tile, tile)
        for row in axis_offsets(height, tile, overlap)
        for col in axis_offsets(width, tile, overlap)
    ]


def valid_region(window: Window, width: int, height: int) -> np.ndarray:
    """bool H x W: True where the window lies inside the scene (False over padding)."""
    valid = np.zeros((int(window.height), int(window.width)), dtype=bool)
    valid[: max(0, min(int(window.height), height - int(window.row_off))),
          : max(0, min(int(window.width), width - int(window.col_off)))] = True
    return valid
