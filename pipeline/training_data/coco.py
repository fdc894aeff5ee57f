"""Polygons in a scene window -> COCO annotations in tile pixels, exact to the pixel.

The object is burned into the tile with GDAL's rule (a pixel belongs to the polygon when its centre does)
and the annotation is built from that mask: hole-free objects as COCO polygons traced along pixel edges
(pycocotools fills such rectilinear outlines back to exactly the same pixels), objects with holes as RLE
(COCO polygons cannot hold holes). Several parts stay several polygons of one annotation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
import rasterio.features
from affine import Affine
from pycocotools import mask as mask_utils
from shapely.geometry import shape


def burn(geom: Any, window_transform: Affine, height: int, width: int) -> np.ndarray:
    """uint8 mask of `geom` (scene CRS) over a window, pixel-centre rule."""
    return rasterio.features.rasterize([(geom, 1)], out_shape=(height, width), transform=window_transform,
                                       fill=0, all_touched=False, dtype="uint8")


def segmentation_of(mask: np.ndarray) -> list[list[float]] | dict[str, Any]:
    """COCO polygons (one list per part) when no part has a hole, else compressed RLE."""
    outlines = [shape(g) for g, _ in rasterio.features.shapes(mask, mask=mask > 0)]
    if any(len(poly.interiors) for poly in outlines):
        rle = mask_utils.encode(np.asfortranarray(mask))
        return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return [[float(v) for v in np.asarray(poly.exterior.coords)[:-1].ravel()] for poly in outlines]


def without_specks(mask: np.ndarray, min_part_px: int) -> np.ndarray:
    """The mask without its 4-connected parts under `min_part_px` pixels, its largest part always kept."""
    if min_part_px <= 0 or not mask.any():
        return mask
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = (sizes >= min_part_px) | (sizes == sizes.max())
    keep[0] = False
    return keep[labels].astype(mask.dtype)


def annotation_body(geom: Any, window_transform: Affine, height: int, width: int, min_area_px: float,
                    min_part_px: int = 0) -> dict[str, Any] | None:
    """segmentation, bbox [x, y, w, h], area (pixels) and iscrowd of `geom` in one tile; None if too small.
    Parts under `min_part_px` pixels are left out (but the largest), as `run` leaves them out of its output."""
    mask = without_specks(burn(geom, window_transform, height, width), min_part_px)
    area = int(mask.sum())
    if area == 0 or area < min_area_px:
        return None
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    bbox = [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]
    return {"segmentation": segmentation_of(mask), "bbox": bbox, "area": area, "iscrowd": 0}
