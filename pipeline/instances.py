"""The compact record each detection travels as: its mask cropped to its box, in scene pixels.

Never whole-tile or whole-scene masks: a tile's results cost O(object pixels), not O(tile area), so what the
workers send back and what the merge holds stays small whatever the scene size. A model's output comes in
one of two forms (README, "Pluggable model step"): torchvision's (a probability mask of the whole tile per
detection) or the compact one (a boolean mask cropped to each detection, made where the model runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from pipeline.rect import Rect


@dataclass
class Instance:
    row: int  # top-left of the mask crop, scene pixels
    col: int
    mask: np.ndarray  # bool h x w, tight (no empty border rows or columns)
    score: float
    label: int
    window: Rect  # the window that saw it
    tile: int = 0  # that window's index in the scene's plan
    position: int = 0  # its place among the window's detections: with `tile`, the output's row order

    @cached_property
    def box(self) -> Rect:
        """The mask's box (an instance is not changed once made: `dataclasses.replace` makes a new one)."""
        h, w = self.mask.shape
        return Rect(self.col, self.row, self.col + w, self.row + h)

    @property
    def key(self) -> tuple[int, int]:
        return self.tile, self.position


def tight(masks: list[np.ndarray], origins: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Crop each mask to its occupied rows and columns: (crops, new (row, col) origins, non-empty flags)."""
    crops, out, nonempty = [], origins.copy(), np.zeros(len(masks), dtype=bool)
    for k, mask in enumerate(masks):
        if mask.size and mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any():
            crops.append(mask)  # already tight, as a model's crop usually is: four edge checks, no scan
            nonempty[k] = True
            continue
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            crops.append(mask[:0, :0])
            continue
        nonempty[k] = True
        crops.append(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
        out[k] += (rows[0], cols[0])
    return crops, out, nonempty


def from_compact(mask_boxes: np.ndarray, crops: list[np.ndarray], scores: np.ndarray, labels: np.ndarray,
                 window: Rect, tile: int, valid: np.ndarray, score_threshold: float) -> list[Instance]:
    """Instances from the compact form: `mask_boxes` (N x 4 x0, y0, x1, y1 in tile pixels, end exclusive)
    place each boolean crop in the tile. Pixels outside `valid` (padding, nodata) are cleared and crops
    tightened; detections left empty or under the score threshold are dropped."""
    keep = np.flatnonzero(np.asarray(scores) >= score_threshold)
    masks, origins = [], np.zeros((len(keep), 2), dtype=np.int64)
    height, width = valid.shape
    everywhere = bool(valid.all())  # the common case: no padding, no nodata in the tile
    for n, i in enumerate(keep):
        x0, y0, x1, y1 = (int(v) for v in mask_boxes[i])
        crop = np.asarray(crops[i], dtype=bool)
        if crop.shape != (y1 - y0, x1 - x0):
            raise ValueError(f"mask crop {i} is {crop.shape} but its box is {y1 - y0} x {x1 - x0}")
        # Clip to the tile, then clear what is not valid image.
        cy0, cx0, cy1, cx1 = max(y0, 0), max(x0, 0), min(y1, height), min(x1, width)
        crop = crop[cy0 - y0:max(cy1, cy0) - y0, cx0 - x0:max(cx1, cx0) - x0]
        masks.append(crop if everywhere else crop & valid[cy0:cy1, cx0:cx1])
        origins[n] = (cy0, cx0)
    masks, origins, nonempty = tight(masks, origins)
    return [Instance(row=window.row0 + int(origins[n, 0]), col=window.col0 + int(origins[n, 1]), mask=masks[n],
                     score=float(scores[i]), label=int(labels[i]), window=window, tile=tile)
            for n, i in enumerate(keep) if nonempty[n]]


def from_dense(masks_prob: np.ndarray, scores: np.ndarray, labels: np.ndarray, window: Rect, tile: int,
               valid: np.ndarray, mask_threshold: float, score_threshold: float) -> list[Instance]:
    """Instances from torchvision's form: N x H x W mask probabilities over the whole tile, thresholded here
    (one vectorized pass over the kept detections, then each instance costs only the copy of its crop)."""
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
    return [
        Instance(row=window.row0 + int(r0[k]), col=window.col0 + int(c0[k]),
                 mask=binary[k, r0[k]:r1[k], c0[k]:c1[k]].copy(),  # a copy, so the tile-sized array can be freed
                 score=float(scores[i]), label=int(labels[i]), window=window, tile=tile)
        for k, i in enumerate(keep) if nonempty[k]
    ]


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (on any device) or array-like as a numpy array, without importing torch here."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def from_output(output: dict[str, Any], window: Rect, tile: int, valid: np.ndarray, mask_threshold: float,
                score_threshold: float) -> list[Instance]:
    """A tile's instances from a predictor's output in either form, numbered in the output's order."""
    scores, labels = to_numpy(output["scores"]).astype(np.float64), to_numpy(output["labels"]).astype(np.int64)
    if "mask_crops" in output:
        found = from_compact(to_numpy(output["mask_boxes"]).astype(np.int64).reshape(-1, 4),
                             [to_numpy(c) for c in output["mask_crops"]], scores, labels, window, tile, valid,
                             score_threshold)
    else:
        masks = to_numpy(output["masks"])
        found = from_dense(masks.reshape(len(masks), *masks.shape[-2:]), scores, labels, window, tile, valid,
                           mask_threshold, score_threshold)
    for position, inst in enumerate(found):
        inst.position = position
    return found


@dataclass
class InstanceBlock:
    """Instances as a few flat arrays: how a tile's detections cross Ray and are saved for a resume
    (no per-object Python objects to pickle, no pickle at all in the saved file)."""

    origins: np.ndarray  # (N, 2) int64 (row, col)
    shapes: np.ndarray  # (N, 2) int64 (h, w)
    bits: np.ndarray  # packed mask bits, all masks one after the other
    scores: np.ndarray  # (N,) float64
    labels: np.ndarray  # (N,) int64
    positions: np.ndarray  # (N,) int64

    @classmethod
    def of(cls, instances: list[Instance]) -> InstanceBlock:
        bits = np.concatenate([m.mask.ravel() for m in instances]) if instances else np.zeros(0, dtype=bool)
        return cls(origins=np.array([(m.row, m.col) for m in instances], dtype=np.int64).reshape(-1, 2),
                   shapes=np.array([m.mask.shape for m in instances], dtype=np.int64).reshape(-1, 2),
                   bits=np.packbits(bits), scores=np.array([m.score for m in instances], dtype=np.float64),
                   labels=np.array([m.label for m in instances], dtype=np.int64),
                   positions=np.array([m.position for m in instances], dtype=np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def instances(self, window: Rect, tile: int) -> list[Instance]:
        """The instances, in Python numbers (the merge runs on them: numpy scalars are slower to compute
        with), their masks views of one unpacked array."""
        sizes = self.shapes[:, 0] * self.shapes[:, 1]
        bits = np.unpackbits(self.bits, count=int(sizes.sum())).view(bool)
        ends = np.cumsum(sizes).tolist()
        return [Instance(row=r, col=c, mask=bits[end - h * w:end].reshape(h, w), score=score, label=label,
                         window=window, tile=tile, position=position)
                for (r, c), (h, w), end, score, label, position in
                zip(self.origins.tolist(), self.shapes.tolist(), ends, self.scores.tolist(), self.labels.tolist(),
                    self.positions.tolist())]
