"""Mask -> map polygon: burned back into its window with the same affine it covers exactly the mask; the
pixel-edge tracer agrees with GDAL's polygonize on any mask."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio.features
from affine import Affine
from shapely.geometry import GeometryCollection, LineString, MultiPolygon, box

import shapely
from shapely.geometry import shape

from pipeline.polygonize import masks_to_geometries, polygonal


def mask_to_geometry(mask: np.ndarray, row: int, col: int, scene_transform: Affine, simplify_px: float = 0.0):
    (geom,) = masks_to_geometries([(mask, row, col)], scene_transform, simplify_px)
    return geom

TRANSFORMS = {
    "utm north-up": Affine(0.5, 0, 733_600, 0, -0.5, 3_724_800),
    "degrees, tiny pixels": Affine(1e-6, 0, -84.39, 0, -1e-6, 33.75),
    "rotated": Affine.translation(500_000, 4_000_000) * Affine.rotation(30) * Affine.scale(0.3, -0.3),
    "sheared": Affine(0.4, 0.1, 10, 0.1, -0.4, 50),
}


def burned(geom, mask: np.ndarray, row: int, col: int, transform: Affine) -> np.ndarray:
    """The geometry rasterized (pixel centres) into the mask's own window of the scene grid."""
    window_transform = transform * Affine.translation(col, row)
    return rasterio.features.rasterize([geom], out_shape=mask.shape, transform=window_transform).astype(bool)


def shapes() -> dict[str, np.ndarray]:
    ring = np.ones((12, 14), dtype=bool)
    ring[4:8, 3:10] = False
    two_parts = np.zeros((9, 20), dtype=bool)
    two_parts[1:8, 0:6] = True
    two_parts[0:3, 9:20] = True
    staircase = np.tri(25, 25, dtype=bool)  # diagonal edge, one pixel per step
    checker = (np.indices((8, 8)).sum(axis=0) % 2).astype(bool)  # parts touching only at corners
    island = np.ones((11, 11), dtype=bool)
    island[2:9, 2:9] = False
    island[4:7, 4:7] = True  # a part inside another part's hole
    island[1, 1] = False  # a hole touching the outer hole diagonally
    rng = np.random.default_rng(5)
    ragged = rng.random((30, 40)) > 0.5
    return {"ring": ring, "two parts": two_parts, "staircase": staircase, "checker": checker, "island": island,
            "ragged": ragged, "one pixel": np.ones((1, 1), dtype=bool)}


@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("name", shapes().keys())
def test_polygon_burns_back_onto_exactly_the_mask(name, transform):
    mask = shapes()[name]
    geom = mask_to_geometry(mask, 7, 11, transform)
    assert geom.is_valid and isinstance(geom, MultiPolygon)
    assert np.array_equal(burned(geom, mask, 7, 11, transform), mask)
    # The area is the pixel count times the pixel area: no sliver lost or added.
    assert geom.area == pytest.approx(mask.sum() * abs(transform.determinant), rel=1e-9)


def test_holes_and_parts_are_kept():
    t = TRANSFORMS["utm north-up"]
    ring = mask_to_geometry(shapes()["ring"], 0, 0, t)
    assert len(ring.geoms) == 1 and len(ring.geoms[0].interiors) == 1
    parts = mask_to_geometry(shapes()["two parts"], 0, 0, t)
    assert isinstance(parts, MultiPolygon) and len(parts.geoms) == 2


def test_pixel_corners_land_on_the_affine():
    mask = np.ones((2, 3), dtype=bool)
    t = Affine(0.5, 0, 1000, 0, -0.5, 2000)
    geom = mask_to_geometry(mask, row=10, col=20, scene_transform=t)
    # Pixel (col 20, row 10)'s top-left corner is the affine applied to (20, 10).
    assert geom.bounds == pytest.approx((1010.0, 1994.0, 1011.5, 1995.0))


@pytest.mark.parametrize("transform", [TRANSFORMS["utm north-up"], TRANSFORMS["degrees, tiny pixels"]])
def test_simplification_is_in_pixels_whatever_the_map_units(transform):
    staircase = np.tri(40, 40, dtype=bool)
    exact = mask_to_geometry(staircase, 0, 0, transform)
    simple = mask_to_geometry(staircase, 0, 0, transform, simplify_px=1.0)
    assert simple.is_valid and len(simple.geoms[0].exterior.coords) < 8 < len(exact.geoms[0].exterior.coords)
    overlap = (burned(simple, staircase, 0, 0, transform) == staircase).mean()
    assert overlap > 0.95


def test_simplified_parts_and_holes_stay_valid():
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = rng.random((25, 25)) > 0.45
        geom = mask_to_geometry(mask, 3, 4, TRANSFORMS["rotated"], simplify_px=1.5)
        assert geom.is_valid and isinstance(geom, MultiPolygon) and not geom.is_empty


def test_empty_mask_is_refused():
    with pytest.raises(ValueError, match="empty"):
        mask_to_geometry(np.zeros((3, 3), dtype=bool), 0, 0, Affine.identity())


def test_a_repaired_geometry_keeps_only_its_area():
    repaired = GeometryCollection([box(0, 0, 1, 1), LineString([(1, 1), (3, 3)]), box(5, 5, 6, 6)])
    assert polygonal(repaired).equals(MultiPolygon([box(0, 0, 1, 1), box(5, 5, 6, 6)]))
    assert polygonal(box(0, 0, 1, 1)).equals(box(0, 0, 1, 1))


def gdal_polygons(mask: np.ndarray, row: int, col: int):
    parts = [shape(g) for g, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask, connectivity=4,
                                                           transform=Affine.translation(col, row))]
    return MultiPolygon(parts)


def test_the_tracer_agrees_with_gdal_on_random_masks_traced_together():
    """Many masks of one tile at once (some overlapping, some touching), ragged enough for every corner case:
    parts touching at a corner, holes touching the outline or each other, islands in holes."""
    rng = np.random.default_rng(7)
    for _ in range(60):
        masks = []
        for _ in range(int(rng.integers(1, 7))):
            mask = rng.random(tuple(rng.integers(1, 16, 2))) < rng.uniform(0.3, 0.9)
            mask.flat[0] = True
            masks.append((mask, int(rng.integers(0, 40)), int(rng.integers(0, 40))))
        geoms = masks_to_geometries(masks, Affine.identity())
        for geom, (mask, row, col) in zip(geoms, masks):
            reference = gdal_polygons(mask, row, col)
            assert geom.is_valid and shapely.equals(geom, reference)
            assert len(geom.geoms) == len(reference.geoms)
            assert sum(len(p.interiors) for p in geom.geoms) == sum(len(p.interiors) for p in reference.geoms)
