"""The compact record each detection travels as: its mask cropped to its box, in scene pixels.

Never whole-tile or whole-scene masks: a tile's results cost O(object pixels), not O(tile area).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Instance:
    row: int  # top-left of the mask crop, scene pixels
    col: int
    mask: np.ndarray  # bool h x w, tight (no empty border rows or columns)
    score: float
    label: int
    window: tuple[int, int, int, int]  # (col_off, row_off, width, height) of the tile that saw it

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(col0, row0, col1, row1), pixel corners, end exclusive."""
        h, w = self.mask.shape
        return self.col, self.row, self.col + w, self.row + h


def from_tile_prediction(
    masks_prob: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    window: tuple[int, int, int, int],
    valid: np.ndarray,
    mask_threshold: float,
    score_threshold: float,
) -> list[Instance]:
    """Threshold a tile's N x H x W mask probabilities into cropped instances in scene pixels.

    Pixels outside `valid` (padding past the scene edge) are cleared first, so padding never yields objects.
    """
    keep = np.flatnonzero(scores >= score_threshold)
    col_off, row_off = int(window[0]), int(window[1])
    if keep.size == 0:
        return []
    binary = masks_prob[keep] >= mask_threshold  # one vectorized pass for every instance of the tile
    binary &= valid
    rows_any, cols_any = binary.any(axis=2), binary.any(axis=1)
    out: list[Instance] = []
    for k, i in enumerate(keep):
        rows, cols = np.flatnonzero(rows_any[k]), np.flatnonzero(cols_any[k])
        if rows.size == 0:
            continue
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        out.append(Instance(row=row_off + int(r0), col=col_off + int(c0), mask=binary[k, r0:r1, c0:c1].copy(),
                            score=float(scores[i]), label=int(labels[i]), window=tuple(int(v) for v in window)))
    return out
