"""Masks -> polygons in map coordinates, with the pixel-corner convention of the scene's affine.

Pixel (col, row) covers [col, col+1) x [row, row+1) in pixel space; the affine maps those corners to the
map. So a polygon from a mask, burned back into the same grid (pixel centres), covers exactly the mask.
"""

from __future__ import annotations

import numpy as np
import rasterio.features
import shapely
from affine import Affine
from shapely.affinity import affine_transform
from shapely.geometry import MultiPolygon, Polygon


def mask_to_geometry(mask: np.ndarray, row: int, col: int, scene_transform: Affine,
                     simplify_px: float = 0.0) -> Polygon | MultiPolygon:
    """Polygon (holes kept) or MultiPolygon (several parts) of a mask whose top-left pixel is (row, col).

    Simplification runs in pixel space, so `simplify_px` means the same on every scene whatever its CRS
    units; the affine comes last, so rotated and sheared grids are exact too.
    """
    if not mask.any():
        raise ValueError("cannot polygonize an empty mask")
    # Each 4-connected region is one polygon; regions can only touch at a corner point, so the parts form a
    # valid MultiPolygon as they are (no costly union needed).
    regions = [geom["coordinates"] for geom, _ in rasterio.features.shapes(
        mask.astype(np.uint8), mask=mask, connectivity=4, transform=Affine.translation(col, row))]
    geom: Polygon | MultiPolygon = polygons_from_rings(regions)
    if simplify_px > 0:
        geom = shapely.simplify(geom, simplify_px, preserve_topology=True)
    t = scene_transform
    geom = affine_transform(geom, [t.a, t.b, t.d, t.e, t.c, t.f])
    return geom if geom.is_valid else polygonal(shapely.make_valid(geom))


def polygons_from_rings(regions: list[list[list[tuple[float, float]]]]) -> Polygon | MultiPolygon:
    """GeoJSON-style polygons (shell, then holes) -> one Polygon or a MultiPolygon, built by shapely's
    vectorized constructors: a ragged mask has hundreds of rings, and building them one Python object at a
    time was most of the cost of polygonizing."""
    rings = [np.asarray(ring, dtype=float) for region in regions for ring in region]
    lengths = [len(ring) for ring in rings]
    ring_of_vertex = np.repeat(np.arange(len(rings)), lengths)
    region_of_ring = np.repeat(np.arange(len(regions)), [len(region) for region in regions])
    linear_rings = shapely.linearrings(np.concatenate(rings), indices=ring_of_vertex)
    parts = shapely.polygons(linear_rings, indices=region_of_ring)  # first ring of each region: its shell
    return parts[0] if len(parts) == 1 else MultiPolygon(list(parts))


def polygonal(geom: shapely.Geometry) -> Polygon | MultiPolygon:
    """The areal part of a repaired geometry (make_valid may return a collection with stray lines or points)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    polygons = [p for p in shapely.get_parts(geom) if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
    merged = shapely.union_all(polygons)
    return merged if isinstance(merged, (Polygon, MultiPolygon)) else MultiPolygon()
