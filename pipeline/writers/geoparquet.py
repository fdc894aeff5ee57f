"""GeoParquet 1.1 output, written with pyarrow: what data lakes, DuckDB and BigQuery load.

GDAL's Parquet driver is optional and absent from many builds (this project's GDAL has none), so the file
is written by pyarrow itself: the geometry as WKB, a `bbox` struct column {xmin, ymin, xmax, ymax} that the
`geo` metadata declares as the geometry's covering (readers skip row groups outside a query's box without
decoding a polygon), the CRS as PROJJSON. Each batch becomes a row group as it comes, so memory stays flat,
and the run metadata goes into the file's key-value metadata when it closes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from pipeline.features import Rows
from pipeline.writers.arrow import ATTRIBUTES, GEOMETRY, columns
from pipeline.writers.base import METADATA_KEY, Writer

VERSION = "1.1.0"
BBOX_KEYS = ("xmin", "ymin", "xmax", "ymax")
BBOX = pa.struct([(key, pa.float64()) for key in BBOX_KEYS])


def geo_metadata(crs: Any) -> dict[str, Any]:
    """The `geo` key of a GeoParquet 1.1 file with one MultiPolygon WKB column and its bbox covering."""
    return {"version": VERSION, "primary_column": GEOMETRY, "columns": {GEOMETRY: {
        "encoding": "WKB", "geometry_types": ["MultiPolygon"], "crs": crs.to_json_dict(),
        "covering": {"bbox": {key: ["bbox", key] for key in BBOX_KEYS}}}}}


class GeoParquetWriter(Writer):
    title = "GeoParquet"
    records_run = True

    @classmethod
    def recorded(cls, path: Path, layer: str) -> dict[str, Any] | None:
        try:
            return json.loads(pq.ParquetFile(path).metadata.metadata[METADATA_KEY.encode()])
        except Exception:  # not Parquet, not ours: nothing to reuse
            return None

    def open(self) -> None:
        self.schema = ATTRIBUTES.append(pa.field(GEOMETRY, pa.binary())).append(pa.field("bbox", BBOX))
        self.schema = self.schema.with_metadata({"geo": json.dumps(geo_metadata(self.crs))})
        # Dictionary encoding only where values repeat, statistics only where readers use them (the bbox
        # columns prune row groups; min/max of WKB bytes mean nothing): 8 % smaller (bench_writers' objects).
        self.file = pq.ParquetWriter(self.tmp, self.schema, compression="zstd", use_dictionary=["class_name"],
                                     write_statistics=[*ATTRIBUTES.names, *(f"bbox.{k}" for k in BBOX_KEYS)])

    def append(self, rows: Rows, class_names: Sequence[str]) -> None:
        if not len(rows):
            return
        bounds = shapely.bounds(shapely.from_wkb(rows.wkb))
        bbox = pa.StructArray.from_arrays([pa.array(bounds[:, i]) for i in range(4)], fields=list(BBOX))
        self.file.write_batch(pa.record_batch([*columns(rows, class_names), bbox], schema=self.schema))

    def close(self) -> None:
        self.file.add_key_value_metadata({METADATA_KEY: json.dumps(self.metadata, default=str)})
        self.file.close()

    def discard(self) -> None:
        if hasattr(self, "file"):
            self.file.close()
