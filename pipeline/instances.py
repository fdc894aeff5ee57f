"""The compact record each detection travels as: its mask cropped to its box, in scene pixels.

Never whole-tile or whole-scene masks: a tile's results cost O(object pixels), not O(tile area), so what
the workers send back and what the merge holds stays small whatever the scene size.
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
    window: tuple[int, int, int, int]  # (col_off, row_off, width, height) of the tile that saw it, scene pixels

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(col0, row0, col1, row1) in pixel-corner coordinates, end exclusive."""
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
    """Threshold a tile's N x H x W mask probabilities into tightly cropped instances in scene pixels.

    Pixels outside `valid` (padding past the scene edge) are cleared before anything else, so padding never
    yields objects; masks left empty are dropped. Thresholding and box finding are one vectorized pass over
    the kept detections; each instance then costs only the copy of its own crop.
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if masks_prob.shape[1:] != valid.shape:
        raise ValueError(f"masks are {masks_prob.shape[1:]} but the valid region is {valid.shape}")
    keep = np.flatnonzero(scores >= score_threshold)
    if keep.size == 0:
        return []
    binary = masks_prob >= mask_threshold  # never copy the float probabilities: 4x the bytes of the booleans
    if keep.size < len(scores):
        binary = binary[keep]
    binary &= valid
    rows_any, cols_any = binary.any(axis=2), binary.any(axis=1)  # (K, H), (K, W)
    nonempty = rows_any.any(axis=1)
    height, width = valid.shape
    # First and last occupied row/column of every mask at once: argmax finds the first True.
    r0 = rows_any.argmax(axis=1)
    r1 = height - rows_any[:, ::-1].argmax(axis=1)
    c0 = cols_any.argmax(axis=1)
    c1 = width - cols_any[:, ::-1].argmax(axis=1)
    col_off, row_off = int(window[0]), int(window[1])
    win = (col_off, row_off, int(window[2]), int(window[3]))
    return [
        Instance(row=row_off + int(r0[k]), col=col_off + int(c0[k]),
                 mask=binary[k, r0[k]:r1[k], c0[k]:c1[k]].copy(),  # a copy, so the tile-sized array can be freed
                 score=float(scores[i]), label=int(labels[i]), window=win)
        for k, i in enumerate(keep) if nonempty[k]
    ]
