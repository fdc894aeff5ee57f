"""The one rectangle of the pipeline: windows, boxes and regions in scene pixels.

Pixel-corner coordinates with the end excluded: `Rect(0, 0, 512, 512)` is the 512 x 512 pixels from the
scene's top-left pixel. rasterio's `Window` (offset + size) appears only where a raster is read.
"""

from __future__ import annotations

from dataclasses import dataclass

from rasterio.windows import Window


@dataclass(frozen=True, slots=True, order=True)
class Rect:
    col0: int
    row0: int
    col1: int
    row1: int

    @property
    def width(self) -> int:
        return self.col1 - self.col0

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def empty(self) -> bool:
        return self.col1 <= self.col0 or self.row1 <= self.row0

    def intersection(self, other: Rect) -> Rect:
        """The shared part (empty when they do not overlap)."""
        return Rect(max(self.col0, other.col0), max(self.row0, other.row0),
                    min(self.col1, other.col1), min(self.row1, other.row1))

    def contains(self, other: Rect) -> bool:
        return (self.col0 <= other.col0 and self.row0 <= other.row0 and other.col1 <= self.col1
                and other.row1 <= self.row1)

    def grown(self, pixels: int) -> Rect:
        return Rect(self.col0 - pixels, self.row0 - pixels, self.col1 + pixels, self.row1 + pixels)

    def slices(self) -> tuple[slice, slice]:
        """(rows, cols) to index a scene-sized array with."""
        return slice(self.row0, self.row1), slice(self.col0, self.col1)

    def to_window(self) -> Window:
        return Window(self.col0, self.row0, self.width, self.height)

    def tuple(self) -> tuple[int, int, int, int]:
        return self.col0, self.row0, self.col1, self.row1
