"""GeoPackage output: a layer of instance polygons per scene, streamed in batches, appearing only when complete.

Batches are appended to the file as they come, so millions of polygons never sit in one DataFrame; the
file is written under a temporary name and renamed into place only when the block ends without error.
"""

from __future__ import annotations

import json
import shutil
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
from pipeline.style import write_default_style

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


def read_run_metadata(path: Path, layer: str) -> dict[str, Any] | None:
    """The run metadata stored with `layer` in an existing GeoPackage; None when there is none to read."""
    try:
        info = pyogrio.read_info(path, layer=layer)
        return json.loads((info.get("layer_metadata") or {})[METADATA_KEY])
    except Exception:  # not a GeoPackage, no such layer, not ours: nothing to reuse
        return None


class GeoPackageWriter:
    """`with GeoPackageWriter(path, crs, ...) as w: w.write(...)`; the file is renamed into place on success.

    On any error the temporary file is removed and a previous file at `path` stays as it was. With
    `keep_other_layers` the new file starts as a copy of the one at `path`, so several scenes can be
    collected as layers of one GeoPackage, each layer added atomically. The layer gets a default QGIS
    style with one outline colour per class (`class_names`: names of class ids 1, 2, ...).
    """

    def __init__(self, path: str | Path, crs: CRS | str, layer: str = "instances",
                 metadata: dict[str, Any] | None = None, overwrite: bool = False,
                 class_names: Sequence[str] | None = None, keep_other_layers: bool = False):
        self.path, self.crs, self.layer = Path(path), CRS.from_user_input(crs), layer
        # The layer's GDAL metadata, which GeoPackage keeps inside the file (gpkg_metadata table), as one
        # JSON item so nested configs survive: json.loads(pyogrio.read_info(path)["layer_metadata"][METADATA_KEY])
        self.metadata = {METADATA_KEY: json.dumps(metadata or {}, default=str)}
        self.overwrite, self.keep_other_layers = overwrite, keep_other_layers
        self.classes = {i + 1: str(name) for i, name in enumerate(class_names or [])}
        self.count = 0
        self.started = False

    def __enter__(self) -> "GeoPackageWriter":
        self._atomic = atomic_path(self.path, overwrite=self.overwrite or self.keep_other_layers)
        self.tmp = self._atomic.__enter__()
        if self.keep_other_layers and self.path.exists():
            shutil.copyfile(self.path, self.tmp)
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
        options: dict[str, Any] = {}
        if not self.started:  # a new layer (replacing one of the same name in a copied file)
            options["layer_metadata"] = self.metadata
            if not self.tmp.exists():
                # GeoPackage 1.2: QGIS builds on older GDAL warn about the 1.4 files newer GDAL writes by default.
                options["dataset_options"] = {"VERSION": "1.2"}
        pyogrio.write_dataframe(frame, self.tmp, layer=self.layer, driver="GPKG", append=self.started,
                                promote_to_multi=True, geometry_type="MultiPolygon", **options)
        self.started = True
        self.classes.update(zip((int(c) for c in class_ids), (str(n) for n in class_names)))
        self.count += len(frame)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                if not self.started:
                    self.write([], [], [], [])  # no instances: still a valid layer with its schema
                write_default_style(self.tmp, self.layer, self.classes or {1: "object"})
            except BaseException as error:
                self._atomic.__exit__(type(error), error, error.__traceback__)  # removes the temporary file
                raise
        return bool(self._atomic.__exit__(exc_type, exc, tb))
