"""Output formats, chosen by the output's suffix: one module per format behind one interface (`base.Writer`).

The run spine asks `writer_for(output)` for the class that writes the file, and
`read_result_fingerprint` for what an existing output was made from (the up-to-date skip). Adding a
format is one module with a `Writer` subclass and one line in `WRITERS`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from typing import TYPE_CHECKING

from core.errors import UserError

if TYPE_CHECKING:  # the formats' modules are imported when used: settings and --help stay light
    from pipeline.writers.base import Writer

# suffix -> "module:class" under pipeline.writers, imported when first used (pyarrow only for the formats
# that need it).
WRITERS: dict[str, str] = {
    ".gpkg": "geopackage:GeoPackageWriter",
    ".parquet": "geoparquet:GeoParquetWriter",
    ".fgb": "flatgeobuf:FlatGeobufWriter",
    ".shp": "shapefile:ShapefileWriter",
    ".geojson": "geojson:GeoJSONWriter",
}
FORMATS = [suffix[1:] for suffix in WRITERS]  # the names `--format` takes


def writer_for(output: str | Path) -> type[Writer]:
    """The writer class of `output`'s suffix; a one-line error naming the formats for any other suffix."""
    suffix = Path(output).suffix.lower()
    if suffix not in WRITERS:
        raise UserError(f"{output}: the output's suffix chooses its format, one of {', '.join(WRITERS)} "
                        f"(got {suffix or 'no suffix'})")
    module, name = WRITERS[suffix].split(":")
    return getattr(importlib.import_module(f"pipeline.writers.{module}"), name)


def read_result_fingerprint(output: Path, layer: str, report: Path) -> tuple[str | None, bool] | None:
    """(result fingerprint, complete) of the run that wrote `output` (its `layer`), or None when nothing
    says which run that was. Formats that keep metadata hold it in the file; for the others the run report
    `report` beside the output is the record, taken only when it names this very file."""
    writer = writer_for(output)
    if writer.records_run:
        recorded = writer.recorded(output, layer)
    else:
        try:
            recorded = json.loads(report.read_text())
            if Path(recorded["summary"]["output"]).name != output.name:
                recorded = None  # the report of another output of the same name (x.fgb beside x.shp)
        except Exception:  # no report, not ours
            recorded = None
    if not isinstance(recorded, dict):
        return None
    return recorded.get("result_fingerprint"), bool(recorded.get("complete"))
