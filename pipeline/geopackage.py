"""GeoPackage output: one layer of instance polygons, streamed in batches, appearing only when complete.

Batches are appended to the file as they come, so millions of polygons never sit in one DataFrame; the
file is written under a temporary name and renamed into place only when the block ends without error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from pyproj import CRS, Transformer
from pyproj.crs import ProjectedCRS
from pyproj.crs.coordinate_operation import LambertAzimuthalEqualAreaConversion

from model.files import atomic_path

METADATA_KEY = "aerial_seg_run"


def areas_m2(geoms: Sequence[Any], crs: CRS | str) -> np.ndarray:
    """True areas in square metres, on the ellipsoid of the CRS's datum.

    Planar area is only right in an equal-area projection: Web Mercator inflates it by 1/cos^2(latitude),
    UTM by its scale factor squared (-0.08 % to +0.2 %), and degrees have no area at all. So all
    coordinates go, in one vectorized transform (which also takes care of linear units such as US survey
    feet), to a Lambert azimuthal equal-area projection on the CRS's own ellipsoid, centred on the batch,
    where planar area is the ellipsoidal area; shapely then measures every polygon at once.
    """
    crs = CRS.from_user_input(crs)
    geoms = np.asarray(list(geoms), dtype=object)
    if geoms.size == 0:
        return np.zeros(0, dtype=np.float64)
    present = geoms[~shapely.is_empty(geoms)]
    if present.size == 0:
        return np.zeros(geoms.size, dtype=np.float64)
    geographic = crs.geodetic_crs or CRS.from_epsg(4326)
    # Centred on one of the polygons, never near the projection's antipodal singularity.
    x, y = shapely.get_coordinates(shapely.point_on_surface(present[0]))[0]
    lon, lat = Transformer.from_crs(crs, geographic, always_xy=True).transform(x, y)
    equal_area = ProjectedCRS(LambertAzimuthalEqualAreaConversion(lat, lon), geodetic_crs=geographic)
    project = Transformer.from_crs(crs, equal_area, always_xy=True)
    projected = shapely.transform(geoms, lambda xy: np.column_stack(project.transform(xy[:, 0], xy[:, 1])))
    return shapely.area(projected).astype(np.float64)


class GeoPackageWriter:
    """`with GeoPackageWriter(path, crs, ...) as w: w.write(...)`; the file is renamed into place on success.

    On any error the temporary file is removed and a previous file at `path` stays as it was.
    """

    def __init__(self, path: str | Path, crs: CRS | str, layer: str = "instances",
                 metadata: dict[str, Any] | None = None, overwrite: bool = False):
        self.path, self.crs, self.layer = Path(path), CRS.from_user_input(crs), layer
        # The layer's GDAL metadata, which GeoPackage keeps inside the file (gpkg_metadata table), as one
        # JSON item so nested configs survive: json.loads(pyogrio.read_info(path)["layer_metadata"][METADATA_KEY])
        self.metadata = {METADATA_KEY: json.dumps(metadata or {}, default=str)}
        self.overwrite = overwrite
        self.count = 0

    def __enter__(self) -> "GeoPackageWriter":
        self._atomic = atomic_path(self.path, overwrite=self.overwrite)
        self.tmp = self._atomic.__enter__()
        return self

    def write(self, geoms: Sequence[Any], class_ids: Sequence[int], class_names: Sequence[str],
              scores: Sequence[float]) -> None:
        """Append one batch of polygons (Polygon or MultiPolygon, in the writer's CRS) and their attributes."""
        frame = gpd.GeoDataFrame(
            {
                "class_name": np.asarray(class_names, dtype=object),
                "class_id": np.asarray(class_ids, dtype=np.int32),
                "score": np.asarray(scores, dtype=np.float32),
                "area_m2": areas_m2(geoms, self.crs),
            },
            geometry=gpd.GeoSeries(list(geoms), crs=self.crs),
        )
        first = not self.tmp.exists()
        pyogrio.write_dataframe(
            frame, self.tmp, layer=self.layer, driver="GPKG", append=not first, promote_to_multi=True,
            geometry_type="MultiPolygon",
            # GeoPackage 1.2: QGIS builds on older GDAL warn about the 1.4 files newer GDAL writes by default.
            **({"layer_metadata": self.metadata, "dataset_options": {"VERSION": "1.2"}} if first else {}),
        )
        self.count += len(frame)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and not self.tmp.exists():
            try:
                self.write([], [], [], [])  # no instances: still a valid layer with its schema
            except BaseException as error:
                self._atomic.__exit__(type(error), error, error.__traceback__)  # removes the temporary file
                raise
        return bool(self._atomic.__exit__(exc_type, exc, tb))
