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

import numpy as np
import pyogrio
import pyogrio.raw
from pyproj import CRS

from model.files import atomic_path
from pipeline.features import Rows
from pipeline.style import write_default_style

METADATA_KEY = "aerial_seg_run"


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
        self.set_metadata(metadata or {})
        self.overwrite, self.keep_other_layers = overwrite, keep_other_layers
        self.classes = {i + 1: str(name) for i, name in enumerate(class_names or [])}
        self.count = 0
        self.started = False

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """The layer's GDAL metadata, which GeoPackage keeps inside the file (gpkg_metadata table), as one JSON
        item so nested configs survive: json.loads(pyogrio.read_info(path)["layer_metadata"][METADATA_KEY]).
        What is set when the writer closes is what the file keeps."""
        self.metadata = {METADATA_KEY: json.dumps(metadata, default=str)}

    def __enter__(self) -> "GeoPackageWriter":
        # Each append commits a SQLite transaction, which by default waits for the disk (fsync) every time:
        # 100 ms per batch on a busy disk. The file being written is a temporary one, renamed into place
        # only once it is complete and synced (`atomic_path`), so a crash can never leave a damaged output.
        pyogrio.set_gdal_config_options({"OGR_SQLITE_SYNCHRONOUS": "OFF"})
        self._atomic = atomic_path(self.path, overwrite=self.overwrite or self.keep_other_layers)
        self.tmp = self._atomic.__enter__()
        if self.keep_other_layers and self.path.exists():
            shutil.copyfile(self.path, self.tmp)
        return self

    def write(self, rows: Rows, class_names: Sequence[str]) -> None:
        """Append one batch of rows (WKB polygons in the writer's CRS, their attributes) as they are: no
        geometry object is built here."""
        options: dict[str, Any] = {"layer_metadata": self.metadata}  # the last batch's metadata stays
        if not self.tmp.exists():
            # GeoPackage 1.2: QGIS builds on older GDAL warn about the 1.4 files newer GDAL writes by default.
            options["dataset_options"] = {"VERSION": "1.2"}
        fields = [np.asarray(class_names, dtype=object), rows.class_ids.astype(np.int32),
                  rows.scores.astype(np.float32), rows.areas.astype(np.float64)]
        pyogrio.raw.write(self.tmp, geometry=np.array(rows.wkb, dtype=object), field_data=fields,
                          fields=["class_name", "class_id", "score", "area_m2"], layer=self.layer, driver="GPKG",
                          geometry_type="MultiPolygon", crs=self.crs.to_wkt(), promote_to_multi=True,
                          append=self.started, **options)
        self.started = True
        self.classes.update(zip(rows.class_ids.tolist(), (str(n) for n in class_names)))
        self.count += len(rows)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            try:
                # The run's metadata as it stands at the end (counts, failed windows), on a layer that exists
                # even without instances.
                self.write(Rows.empty(), [])
                write_default_style(self.tmp, self.layer, self.classes or {1: "object"})
            except BaseException as error:
                self._atomic.__exit__(type(error), error, error.__traceback__)  # removes the temporary file
                raise
        return bool(self._atomic.__exit__(exc_type, exc, tb))
