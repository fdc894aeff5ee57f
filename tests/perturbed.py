"""A real model's view for the seam merge, and the yardstick that counts what the merge makes of it.

The oracle (tests/oracle.py) reports every fragment exactly as it is; a real model does not. Here each
window reports the true objects it sees, each with its outline grown or shrunk by up to 2 px (a different
draw in every window, so two windows see one object with outlines up to 4 px apart, and an object just
across a window's inner edge may give it a sliver of a few pixels), scores drawn in [0.6, 1], and some
classes flipped from one window to the next (class 1 in one window, 2 in its neighbour). Where a window's
edge cuts an object, its view reaches the edge, as a model's mask of an object running off its image does;
or, with `cut_views_shrink`, the cut fragment itself is shrunk, so the view may stop up to 2 px short of
the edge. It works at the merge's level (compact detections through `from_compact`, as a worker makes
them): no raster, no Ray, so a scene of 512 px windows costs milliseconds. Shared by
tests/test_seams_perturbed.py and tests/benchmarks/bench_seams.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.instances import Instance, from_compact
from pipeline.merge import MergedObject
from pipeline.raster import EIGHT
from pipeline.rect import Rect
from pipeline.windows import WindowGrid, axis_offsets, plan_windows, valid_region

JITTER = 2  # px a view is grown or shrunk by, at most
FLIP = 0.2  # chance that a window reports an object under the other class


@dataclass(frozen=True)
class TrueObject:
    row: int
    col: int
    mask: np.ndarray  # bool, tight
    label: int  # 1 or 2

    @property
    def box(self) -> Rect:
        return Rect(self.col, self.row, self.col + self.mask.shape[1], self.row + self.mask.shape[0])


def fits_in_a_window(box: Rect, grid: WindowGrid) -> bool:
    """Does one window hold all of `box`? (The parts of a two-part object are tied together only there.)"""
    return any(w.contains(box) for w in grid)


def seam_scene(tile: int, overlap: int, seed: int, count: int = 40) -> tuple[WindowGrid, list[TrueObject]]:
    """A scene of 3 x 3 windows and its objects, laid across the seams: a block on a four-window corner
    (larger than the overlap), a bar across every column (longer than a window), a ring with a hole across a
    seam, two objects 2 px apart astride a seam, then random rectangles, L-shapes, rings and two-part objects,
    four in five centred near a seam. Every object is at least 8 px thick (a 2 px shrink leaves it whole)
    and at least 2 px from every other (a 2 px growth makes neighbours' views overlap, as a real model's do).

    Without overlap, the windows share only the seam line, and two objects facing each other across it,
    each within JITTER px of it, look exactly like one object cut there whose views stop short of it or
    overshoot it (README, the merge): there, an object either crosses a seam line or keeps more than JITTER
    px from it, and the seam runs through the first of the two objects 2 px apart."""
    stride = tile - overlap
    side = 2 * stride + tile
    grid = plan_windows(side, side, tile, overlap)
    rng = np.random.default_rng(seed)
    seams = [o + overlap // 2 for o in axis_offsets(side, tile, overlap)[1:]]  # centres of the shared bands
    taken = np.zeros((side, side), dtype=bool)
    objects: list[TrueObject] = []

    def place(row: int, col: int, mask: np.ndarray, label: int) -> bool:
        obj = TrueObject(row, col, mask, label)
        box = obj.box
        if box.col0 < 0 or box.row0 < 0 or box.col1 > side or box.row1 > side:
            return False
        near_seam = [(box.col0, box.col1), (box.row0, box.row1)]
        if not overlap and any(x - 1 - JITTER < hi and lo < x + 1 + JITTER and not lo < x < hi
                               for lo, hi in near_seam for x in seams):
            return False
        near = box.grown(JITTER).intersection(Rect(0, 0, side, side))
        grown = ndimage.binary_dilation(np.pad(mask, JITTER), EIGHT, iterations=JITTER)
        grown = grown[near.row0 - box.row0 + JITTER:near.row1 - box.row0 + JITTER,
                      near.col0 - box.col0 + JITTER:near.col1 - box.col0 + JITTER]
        if (taken[near.slices()] & grown).any():
            return False
        taken[box.slices()] |= mask
        objects.append(obj)
        return True

    def ring(outer: int, inner: int) -> np.ndarray:
        yy, xx = np.mgrid[0:2 * outer, 0:2 * outer] + 0.5 - outer
        d = np.hypot(yy, xx)
        return (d < outer) & (d >= inner)

    corner = overlap + 40  # every window around the first four-window corner cuts it
    place(seams[0] - corner // 2, seams[0] - corner // 2, np.ones((corner, corner), dtype=bool), 1)
    place(side - 14, 2, np.ones((10, side - 4), dtype=bool), 2)
    place(seams[1] - 22, seams[0] - 22, ring(22, 9), 2)
    gap = seams[1] + (0 if overlap else 8)
    place(20, gap - 20, np.ones((30, 20), dtype=bool), 1)
    place(20, gap + 2, np.ones((30, 23), dtype=bool), 1)
    kinds = ["rectangle", "L", "ring", "two parts"]
    count = min(count, len(objects) + side * side // 3000)  # as many as fit without a long search
    attempts = 0
    while len(objects) < count and attempts < 100 * count:
        attempts += 1
        kind = kinds[len(objects) % len(kinds)]
        h, w = (int(v) for v in rng.integers(10, 44, 2))
        if kind == "rectangle":
            mask = np.ones((h, w), dtype=bool)
        elif kind == "L":
            h, w = max(h, 20), max(w, 20)
            mask = np.zeros((h, w), dtype=bool)
            mask[:, :8 + h // 6] = mask[-(8 + w // 6):, :] = True
        elif kind == "ring":
            outer = int(rng.integers(14, 22))
            mask = ring(outer, outer - 9)
        else:
            w = max(w, 19)
            mask = np.ones((h, w), dtype=bool)
            mask[:, w // 2 - 1:w // 2 + 2] = False  # a 3 px gap: the two parts of one object
        across = seams[int(rng.integers(len(seams)))] + int(rng.integers(-25, 26))
        if len(objects) % 5 == 0:
            across = int(rng.integers(0, side))  # one in five anywhere: most windows also settle some alone
        along = int(rng.integers(0, side))
        row, col = (across, along) if rng.random() < 0.5 else (along, across)
        row, col = row - mask.shape[0] // 2, col - mask.shape[1] // 2
        if kind == "two parts" and not fits_in_a_window(TrueObject(row, col, mask, 1).box, grid):
            continue
        place(row, col, mask, int(rng.integers(1, 3)))
    return grid, objects


def jittered(mask: np.ndarray, box: Rect, step: int) -> tuple[np.ndarray, Rect]:
    """`mask` (at `box`) grown (step > 0) or shrunk (step < 0) by |step| px, 8-connected, and its new box."""
    if step > 0:
        return ndimage.binary_dilation(np.pad(mask, step), EIGHT, iterations=step), box.grown(step)
    if step < 0:
        return ndimage.binary_erosion(mask, EIGHT, iterations=-step, border_value=0), box
    return mask, box


def perturbed_model(grid: WindowGrid, objects: list[TrueObject], seed: int, flip: float = FLIP,
                    cut_views_shrink: bool = False, jitter: int = JITTER) -> list[Instance]:
    """Every window's detections: each true object it sees with its outline grown or shrunk by 0..`jitter`
    px (the window's own draw), cut by the window (a cut view reaches the window's edge, as a model's mask
    of an object running off its image does), score in [0.6, 1], class flipped with chance `flip`; in score
    order, numbered as a worker numbers them. With `cut_views_shrink`, the fragment the window sees is
    grown or shrunk instead, so a shrunk view of a cut object also stops up to `jitter` px short of the
    window's edge."""
    out: list[Instance] = []
    scene = Rect(0, 0, grid.width, grid.height)
    for index, win in enumerate(grid):
        rng = np.random.default_rng([seed, index])
        seen = win.intersection(scene)
        boxes, crops, scores, labels = [], [], [], []
        for obj in objects:
            if obj.box.intersection(seen).empty:
                continue
            step = int(rng.integers(-jitter, jitter + 1))
            score, flipped = float(rng.uniform(0.6, 1.0)), bool(rng.random() < flip)
            box = obj.box.intersection(seen) if cut_views_shrink else obj.box
            source = obj.mask[box.row0 - obj.row:box.row1 - obj.row, box.col0 - obj.col:box.col1 - obj.col]
            view, box = jittered(source, box, step)
            boxes.append((box.col0 - win.col0, box.row0 - win.row0, box.col1 - win.col0, box.row1 - win.row0))
            crops.append(view)
            scores.append(score)
            labels.append(3 - obj.label if flipped else obj.label)
        order = np.argsort(scores, kind="stable")[::-1]
        found = from_compact(np.array(boxes, dtype=np.int64).reshape(-1, 4)[order], [crops[i] for i in order],
                             np.array(scores)[order], np.array(labels, dtype=np.int64)[order], win, index,
                             valid_region(win, grid.width, grid.height), 0.5)  # clipped to the window, empty dropped
        for position, inst in enumerate(found):
            inst.position = position
        out += found
    return out


@dataclass
class Tally:
    """What a merge made of a scene's true objects.

    Shrunk by 2 px, a 10 px wide object keeps 6 px of it: plain IoU cannot tell a right view from a piece,
    so pixels count as matching within JITTER px. A merged object *stands for* a true object when half or
    more of it lies within JITTER px of that object and half or more of the object lies within JITTER px of
    it; a merged object that stands for none is a *sliver* (a piece of an object, or nothing). A true object
    comes out *once* when exactly one merged object stands for it, *doubled* when more do, *missed* when none
    does. A merged object is *glued* when it holds half or more of the pixels of two true objects. `outline`
    is the worst distance (px, chessboard: the jitter's own measure) between a true object and the one
    merged object standing for it, both ways (Hausdorff)."""

    truths: int = 0
    merged: int = 0
    once: int = 0
    slivers: int = 0
    doubled: int = 0
    missed: int = 0
    glued: int = 0
    outline: int = 0

    @property
    def exact(self) -> bool:
        return (self.merged == self.truths == self.once and not self.slivers and not self.glued
                and self.outline <= JITTER)

    def __iadd__(self, other: Tally) -> Tally:
        for name in ("truths", "merged", "once", "slivers", "doubled", "missed", "glued"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.outline = max(self.outline, other.outline)
        return self


def pasted(boxes_masks: list[tuple[Rect, np.ndarray]]) -> list[np.ndarray]:
    """Masks at their boxes, pasted on one canvas (their common box, JITTER + 1 px wider on every side)."""
    box = Rect(min(b.col0 for b, _ in boxes_masks), min(b.row0 for b, _ in boxes_masks),
               max(b.col1 for b, _ in boxes_masks), max(b.row1 for b, _ in boxes_masks)).grown(JITTER + 1)
    out = []
    for b, mask in boxes_masks:
        canvas = np.zeros((box.height, box.width), dtype=bool)
        canvas[b.row0 - box.row0:b.row1 - box.row0, b.col0 - box.col0:b.col1 - box.col0] = mask
        out.append(canvas)
    return out


def tally(objects: list[TrueObject], merged: list[tuple[int, int, np.ndarray]]) -> Tally:
    """Count `merged` ((row, col, mask) outlines) against the truth (see `Tally`)."""
    result = Tally(truths=len(objects), merged=len(merged))
    standing: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for row, col, mask in merged:
        mbox = Rect(col, row, col + mask.shape[1], row + mask.shape[0])
        halves, stands = 0, []
        for t, obj in enumerate(objects):
            if mbox.grown(JITTER).intersection(obj.box).empty:
                continue
            a, b = pasted([(mbox, mask), (obj.box, obj.mask)])
            halves += 2 * np.count_nonzero(a & b) >= obj.mask.sum()
            near_a = ndimage.binary_dilation(a, EIGHT, iterations=JITTER)
            near_b = ndimage.binary_dilation(b, EIGHT, iterations=JITTER)
            if 2 * np.count_nonzero(a & near_b) >= a.sum() and 2 * np.count_nonzero(b & near_a) >= b.sum():
                stands.append((np.count_nonzero(a & near_b), t, a, b))
        result.glued += halves >= 2
        if not stands:
            result.slivers += 1
            continue
        _, t, a, b = max(stands, key=lambda s: s[:2])
        standing.setdefault(t, []).append((t, a, b))
    for t in range(len(objects)):
        found = standing.get(t, [])
        result.once += len(found) == 1
        result.doubled += len(found) > 1
        result.missed += not found
        if len(found) == 1:
            _, a, b = found[0]
            result.outline = max(result.outline, hausdorff(a, b))
    return result


def hausdorff(a: np.ndarray, b: np.ndarray) -> int:
    """Chessboard Hausdorff distance between two non-empty masks of the same shape."""
    to_a = ndimage.distance_transform_cdt(~a, metric="chessboard")
    to_b = ndimage.distance_transform_cdt(~b, metric="chessboard")
    return int(max(to_b[a].max(), to_a[b].max()))


def outlines(merged: list[MergedObject]) -> list[tuple[int, int, np.ndarray]]:
    """(row, col, mask) of each merged object, as `tally` takes them."""
    return [(row, col, mask) for mask, row, col in (m.mask() for m in merged)]
