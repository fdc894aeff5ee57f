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

from pipeline.features import Rows
from pipeline.style import write_default_style
from pipeline.writers.base import METADATA_KEY, Writer


class GeoPackageWriter(Writer):
    """`with GeoPackageWriter(path, crs, ...) as w: w.write(...)`; the file is renamed into place on success.

    On any error the temporary file is removed and a previous file at `path` stays as it was. With
    `keep_other_layers` the new file starts as a copy of the one at `path`, so several scenes can be
    collected as layers of one GeoPackage, each layer added atomically. The layer gets a default QGIS
    style with one outline colour per class (`class_names`: names of class ids 1, 2, ...), stored in the file.
    """

    title = "GeoPackage"
    layers = True
    records_run = True

    @classmethod
    def recorded(cls, path: Path, layer: str) -> dict[str, Any] | None:
        """The run metadata stored with `layer`; None when there is none to read."""
        try:
            info = pyogrio.read_info(path, layer=layer)
            return json.loads((info.get("layer_metadata") or {})[METADATA_KEY])
        except Exception:  # not a GeoPackage, no such layer, not ours: nothing to reuse
            return None

    def set_metadata(self, metadata: dict[str, Any]) -> None:
        """The layer's GDAL metadata, which GeoPackage keeps inside the file (gpkg_metadata table), as one JSON
        item so nested configs survive: json.loads(pyogrio.read_info(path)["layer_metadata"][METADATA_KEY]).
        What is set when the writer closes is what the file keeps."""
        self.metadata = {METADATA_KEY: json.dumps(metadata, default=str)}

    def open(self) -> None:
        # Each append commits a SQLite transaction, which by default waits for the disk (fsync) every time:
        # 100 ms per batch on a busy disk. The file being written is a temporary one, renamed into place
        # only once it is complete and synced (`atomic_path`), so a crash can never leave a damaged output.
        pyogrio.set_gdal_config_options({"OGR_SQLITE_SYNCHRONOUS": "OFF"})
        self.started = False
        if self.keep_other_layers and self.path.exists():
            shutil.copyfile(self.path, self.tmp)

    def append(self, rows: Rows, class_names: Sequence[str]) -> None:
        """Append one batch of rows as they are: no geometry object is built here."""
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

    def close(self) -> None:
        # The run's metadata as it stands at the end (counts, failed windows), on a layer that exists even
        # without instances.
        self.append(Rows.empty(), [])

    def style(self) -> None:
        write_default_style(self.tmp, self.layer, self.classes or {1: "object"})
