"""Rows as Arrow record batches: the columns every format but GeoPackage is written from.

The attributes are the GeoPackage's (`class_name`, `class_id` int32, `score` float32, `area_m2` float64),
all at most 10 characters long so that a Shapefile keeps them as they are, and the geometry column holds
the rows' WKB untouched: no geometry object is built to write a batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from pipeline.features import Rows

GEOMETRY = "geometry"
ATTRIBUTES = pa.schema([("class_name", pa.string()), ("class_id", pa.int32()), ("score", pa.float32()),
                        ("area_m2", pa.float64())])
# GDAL finds the geometry column by its GeoArrow extension name.
SCHEMA = ATTRIBUTES.append(pa.field(GEOMETRY, pa.binary(), metadata={"ARROW:extension:name": "geoarrow.wkb"}))


def columns(rows: Rows, class_names: Sequence[str]) -> list[pa.Array]:
    """The attribute columns of `rows`, then their WKB (`class_names`: each row's class name)."""
    return [pa.array(list(class_names), pa.string()), pa.array(rows.class_ids.astype(np.int32)),
            pa.array(rows.scores.astype(np.float32)), pa.array(rows.areas.astype(np.float64)),
            pa.array(rows.wkb, pa.binary())]


def record_batch(rows: Rows, class_names: Sequence[str]) -> pa.RecordBatch:
    return pa.record_batch(columns(rows, class_names), schema=SCHEMA)
