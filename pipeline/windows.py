"""Window planning: full-size tiles with overlap, edge windows shifted inward.

Every window is `tile` x `tile`, so the model always sees the same input size. When the scene is smaller
than a tile along an axis, the single window on that axis starts at 0 and extends past the scene; reads
pad it, and `valid_region` tells padding from image so padding never yields objects.

Windows form a grid (every column offset with every row offset), which answers the seam merge's
questions in a few array lookups: which windows see a box, and which pixels only one window sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.rect import Rect


def axis_offsets(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: stride tile - overlap from 0, the last one ending exactly at `length`."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    offsets = list(range(0, length - tile, stride))
    offsets.append(length - tile)
    return offsets


@dataclass(frozen=True)
class WindowGrid(Sequence[Rect]):
    """The windows of a scene in row-major order (a sequence of `Rect`), with the scene's size."""

    width: int
    height: int
    tile: int
    cols: tuple[int, ...]  # column offsets, increasing
    rows: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.cols) * len(self.rows)

    def __getitem__(self, index: int | slice) -> Rect | list[Rect]:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        r, c = divmod(index % len(self), len(self.cols))
        return Rect(self.cols[c], self.rows[r], self.cols[c] + self.tile, self.rows[r] + self.tile)

    def __iter__(self) -> Iterator[Rect]:
        return (self[i] for i in range(len(self)))

    def spans(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For (N, 4) boxes (col0, row0, col1, row1): the grid's column and row index ranges [c0, c1) x
        [r0, r1) of the windows that share at least one pixel with each box."""
        cols, rows = np.asarray(self.cols), np.asarray(self.rows)
        c0 = np.searchsorted(cols + self.tile, boxes[:, 0], side="right")
        c1 = np.searchsorted(cols, boxes[:, 2], side="left")
        r0 = np.searchsorted(rows + self.tile, boxes[:, 1], side="right")
        r1 = np.searchsorted(rows, boxes[:, 3], side="left")
        return c0, c1, r0, r1

    def seen_by(self, box: Rect) -> list[int]:
        """Indices of the windows that share at least one pixel with `box`."""
        c0, c1, r0, r1 = (int(v[0]) for v in self.spans(np.array([box.tuple()])))
        return [r * len(self.cols) + c for r in range(r0, r1) for c in range(c0, c1)]

    def inner(self, window: Rect) -> tuple[bool, bool, bool, bool]:
        """Which sides of a window (left, top, right, bottom) lie inside the scene, where another window
        continues: a model's view is cut there, unlike at the scene's own edge."""
        return window.col0 > 0, window.row0 > 0, window.col1 < self.width, window.row1 < self.height

    def core(self, window: Rect, margin: int) -> Rect:
        """The window less `margin` pixels along its inner sides: what it sees with context on every side."""
        left, top, right, bottom = self.inner(window)
        return Rect(window.col0 + margin * left, window.row0 + margin * top,
                    window.col1 - margin * right, window.row1 - margin * bottom)

    def private(self, window: Rect, reach: int) -> Rect:
        """The pixels of `window` that no other window sees, kept `reach` pixels clear of every other window
        (possibly empty). A detection there cannot meet another window's within the seam rule's reach."""

        def axis(start: int, offsets: tuple[int, ...]) -> tuple[int, int]:
            lo, hi = start, start + self.tile
            for other in offsets:
                if other < start:
                    lo = max(lo, other + self.tile + reach)
                elif other > start:
                    hi = min(hi, other - reach)
            return lo, max(lo, hi)

        c0, c1 = axis(window.col0, self.cols)
        r0, r1 = axis(window.row0, self.rows)
        return Rect(c0, r0, c1, r1)


def plan_windows(width: int, height: int, tile: int, overlap: int) -> WindowGrid:
    """Row-major tile x tile windows covering a width x height scene."""
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap})")
    return WindowGrid(width, height, tile, tuple(axis_offsets(width, tile, overlap)),
                      tuple(axis_offsets(height, tile, overlap)))


def valid_region(window: Rect, width: int, height: int) -> np.ndarray:
    """bool H x W: True where the window lies inside the scene (False over padding)."""
    valid = np.zeros((window.height, window.width), dtype=bool)
    valid[: max(0, min(window.height, height - window.row0)), : max(0, min(window.width, width - window.col0))] = True
    return valid
