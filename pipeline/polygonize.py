"""Masks -> polygons in map coordinates, with the pixel-corner convention of the scene's affine.

Pixel (col, row) covers [col, col+1) x [row, row+1) in pixel space; the affine maps those corners to the
map. So a polygon from a mask, burned back into the same grid (pixel centres), covers exactly the mask.
"""

from __future__ import annotations

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from shapely.geometry import MultiPolygon, Polygon


def mask_to_geometry(mask: np.ndarray, row: int, col: int, scene_transform: Affine,
                     simplify_px: float = 0.0) -> Polygon | MultiPolygon:
    """Polygon (holes kept) or MultiPolygon (several parts) of a mask whose top-left pixel is (row, col)."""
    # Each 4-connected region is one polygon; regions can only touch at a corner point, so the parts form a
    # valid MultiPolygon as they are (no costly union needed).
    parts = [
        Polygon(rings[0], rings[1:])
        for rings, _ in (
            (geom["coordinates"], value)
            for geom, value in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                        transform=Affine.translation(col, row))
        )
    ]
    geom: Polygon | MultiPolygon = parts[0] if len(parts) == 1 else MultiPolygon(parts)
    if simplify_px > 0:
        geom = shapely.simplify(geom, simplify_px, preserve_topology=True)
    t = scene_transform
    geom = shapely.affinity.affine_transform(geom, [t.a, t.b, t.d, t.e, t.c, t.f])
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    return geom
