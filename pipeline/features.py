"""The output's rows: map polygons with their class, score and true area, kept as a few flat arrays.

Rows are made where the tile is (in the worker) and travel as WKB, so the driver that writes them never
builds a geometry object per polygon. Each row carries its place in the output (`keys`: the window's index
in the scene's plan and the detection's position in that window's output), which fixes the row order
whatever order the tiles finish in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import shapely
from pyproj import CRS, Transformer
from pyproj.crs import ProjectedCRS
from pyproj.crs.coordinate_operation import LambertAzimuthalEqualAreaConversion


class AreaMeter:
    """True areas in square metres, on the ellipsoid of the CRS's datum.

    Planar area is only right in an equal-area projection: Web Mercator inflates it by 1/cos^2(latitude),
    UTM by its scale factor squared (-0.08 % to +0.2 %), and degrees have no area at all. So all
    coordinates go, in one vectorized transform (which also takes care of linear units such as US survey
    feet), to a Lambert azimuthal equal-area projection on the CRS's own ellipsoid, centred on the scene
    (`centre`, in the CRS's coordinates), where planar area is the ellipsoidal area. The transformer is made
    once per scene: making one costs milliseconds, more than measuring a tile's polygons.
    """

    def __init__(self, crs: str, centre: tuple[float, float]):
        self.crs, self.centre = crs, centre

    @cached_property
    def project(self) -> Transformer:
        crs = CRS.from_user_input(self.crs)
        geographic = crs.geodetic_crs or CRS.from_epsg(4326)
        lon, lat = Transformer.from_crs(crs, geographic, always_xy=True).transform(*self.centre)
        equal_area = ProjectedCRS(LambertAzimuthalEqualAreaConversion(lat, lon), geodetic_crs=geographic)
        return Transformer.from_crs(crs, equal_area, always_xy=True)

    def __getstate__(self) -> dict:
        return {"crs": self.crs, "centre": self.centre}  # pyproj objects are rebuilt where they are used

    def areas(self, geoms: np.ndarray) -> np.ndarray:
        if len(geoms) == 0:
            return np.zeros(0, dtype=np.float64)
        project = self.project
        projected = shapely.transform(geoms, lambda xy: np.column_stack(project.transform(xy[:, 0], xy[:, 1])))
        return shapely.area(projected).astype(np.float64)


@dataclass
class Rows:
    """Output rows: WKB MultiPolygons in the scene's CRS and their attributes, in `keys` order."""

    keys: np.ndarray  # (N, 2) int64: (window index, position in that window's output)
    wkb: list[bytes]
    class_ids: np.ndarray  # int64
    scores: np.ndarray  # float64
    areas: np.ndarray  # float64, square metres

    @classmethod
    def empty(cls) -> Rows:
        return cls(np.zeros((0, 2), dtype=np.int64), [], np.zeros(0, np.int64), np.zeros(0), np.zeros(0))

    @classmethod
    def of(cls, keys: list[tuple[int, int]], geoms: np.ndarray, class_ids: list[int], scores: list[float],
           meter: AreaMeter, min_area: float = 0.0) -> Rows:
        """Rows of geometries, leaving out any that a repair reduced to nothing or under `min_area` m^2."""
        present = ~shapely.is_empty(geoms) if len(geoms) else np.zeros(0, dtype=bool)
        areas = meter.areas(geoms[present])
        keep = np.flatnonzero(present)[areas >= min_area]
        return cls(np.asarray(keys, dtype=np.int64).reshape(-1, 2)[keep], list(shapely.to_wkb(geoms[keep])),
                   np.asarray(class_ids, dtype=np.int64)[keep], np.asarray(scores, dtype=np.float64)[keep],
                   areas[areas >= min_area])

    def __len__(self) -> int:
        return len(self.wkb)

    def take(self, index: np.ndarray) -> Rows:
        return Rows(self.keys[index], [self.wkb[i] for i in index], self.class_ids[index], self.scores[index],
                    self.areas[index])

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Rows.empty()
        return Rows(np.concatenate([p.keys for p in parts]), [w for p in parts for w in p.wkb],
                    np.concatenate([p.class_ids for p in parts]), np.concatenate([p.scores for p in parts]),
                    np.concatenate([p.areas for p in parts]))

    def sorted(self) -> Rows:
        return self.take(np.lexsort((self.keys[:, 1], self.keys[:, 0])))
