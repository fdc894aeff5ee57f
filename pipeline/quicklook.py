"""Quicklook PNG beside the output: the scene's overview with the polygons outlined, one colour per class,
for a glance without a GIS. Drawn batch by batch as the polygons are written, on a canvas of at most
`max_side` px, so it costs the same whatever the scene size."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio.features

from model.files import atomic_path
from pipeline.raster import Overview, Scaling, SceneInfo, normalize, read_overview, to_uint8, write_png
from pipeline.style import PALETTE



class Quicklook:
    def __init__(self, scene: str, info: SceneInfo, bands: list[int], scaling: Scaling,
                 overview: Overview | None = None, max_side: int = 1024):
        overview = overview if overview is not None else read_overview(scene, info, bands, max_side)
        self.transform = overview.transform
        self.image = to_uint8(normalize(overview.data, scaling), overview.valid)
        self.classes = np.zeros(overview.valid.shape, dtype=np.int32)  # class id of an outline pixel, 0: none

    def draw(self, geoms: Sequence[Any], class_ids: Sequence[int]) -> None:
        shapes = [(g.boundary, int(c)) for g, c in zip(geoms, class_ids) if not g.is_empty]
        if shapes:
            rasterio.features.rasterize(shapes, out=self.classes, transform=self.transform, all_touched=True)

    def save(self, path: Path) -> None:
        rgb = self.image.copy()
        drawn = self.classes > 0
        rgb[:, drawn] = PALETTE[(self.classes[drawn] - 1) % len(PALETTE)].T
        with atomic_path(path) as tmp:
            write_png(tmp, rgb)
