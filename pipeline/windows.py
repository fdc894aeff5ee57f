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


def private_regions(windows: list[Window]) -> list[tuple[int, int, int, int]]:
    """Per window, the rectangle (col0, row0, col1, row1) of scene pixels that no other window sees, kept one
    pixel clear of any other window (so it does not touch a seam either); empty when there is none.

    A detection lying inside it can only be a duplicate within its own window, never a fragment of an
    object another window also saw, so it can be settled as soon as its window is done. Windows form a
    grid (the product of the column and row offsets), so the region is one rectangle per window.
    """
    spans = [sorted({(int(w.col_off), int(w.col_off + w.width)) for w in windows}),
             sorted({(int(w.row_off), int(w.row_off + w.height)) for w in windows})]

    def private(start: int, stop: int, axis: int) -> tuple[int, int]:
        lo, hi = start, stop
        for other_start, other_stop in spans[axis]:
            if other_start < start:
                lo = max(lo, other_stop + 1)
            elif other_start > start:
                hi = min(hi, other_start - 1)
        return lo, max(lo, hi)

    regions = []
    for w in windows:
        c0, c1 = private(int(w.col_off), int(w.col_off + w.width), 0)
        r0, r1 = private(int(w.row_off), int(w.row_off + w.height), 1)
        regions.append((c0, r0, c1, r1))
    return regions
