"""Shapefile output: the format every GIS reads, within its limits.

Field names: at most 10 characters, which the output's attributes are (`class_name` is exactly 10).
Size: a .shp or .dbf file cannot pass 2 GB. Before each batch the writer bounds what the files would then
hold (a .shp record is its WKB plus at most 43 bytes; a .dbf record is fixed, its text field as wide as the
longest class name, 80 at least) and stops the run with one line naming other formats, rather than
leaving a file other programs cannot read; GDAL's own 2GB_LIMIT guards the same limit behind it.
A Shapefile is several files. They are written under temporary names and moved into place with the .shp
last, after removing an older .shp: a set without its .shp is not a Shapefile to any reader, so a partial
set never looks complete. There is no metadata of ours in it: the run report beside it is the record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from core.errors import UserError
from core.files import sync
from pipeline.features import Rows
from pipeline.writers.base import sidecar
from pipeline.writers.ogr import StreamWriter

COMPANIONS = (".shx", ".dbf", ".prj", ".cpg")  # what GDAL writes beside the .shp
STALE = (".qix", ".sbn", ".sbx")  # spatial indexes other programs add: an older file's would mislead
SHP_HEADER, SHP_RECORD = 100, 43  # file header; a record's bytes beyond its WKB's (header, box, counts)
DBF_HEADER, DBF_RECORD = 162, 1 + 9 + 24 + 24  # header with 4 fields and the end byte; deletion flag, numbers
NAME_WIDTH = 80  # GDAL's width of a text field; it widens the field to the longest value


class ShapefileWriter(StreamWriter):
    title = "Shapefile"
    driver = "ESRI Shapefile"
    layer_options = {"2GB_LIMIT": "YES"}
    limit = 2**31 - 1  # bytes of a .shp or .dbf

    @classmethod
    def files(cls, path: Path) -> list[Path]:
        return [path, *(path.with_suffix(e) for e in COMPANIONS), sidecar(path, ".qml")]

    def open(self) -> None:
        self.shp_bytes, self.width = SHP_HEADER, NAME_WIDTH
        super().open()

    def append(self, rows: Rows, class_names: Sequence[str]) -> None:
        shp = self.shp_bytes + sum(len(w) for w in rows.wkb) + SHP_RECORD * len(rows)
        width = max([self.width, *(len(str(n).encode()) for n in class_names)])
        dbf = DBF_HEADER + (self.count + len(rows)) * (DBF_RECORD + width)
        if max(shp, dbf) > self.limit:
            raise UserError(f"{self.path}: more than a Shapefile holds ({self.limit / 2**30:.0f} GB per file) at "
                            f"{self.count + len(rows)} objects; write .gpkg, .fgb or .parquet instead")
        super().append(rows, class_names)
        self.shp_bytes, self.width = shp, width

    def place(self) -> None:
        self.path.unlink(missing_ok=True)  # an older set no longer looks complete while its parts are replaced
        for suffix in STALE:
            self.path.with_suffix(suffix).unlink(missing_ok=True)
        for suffix in COMPANIONS:
            part = self.tmp.with_suffix(suffix)
            if part.exists():
                sync(part)
                os.replace(part, self.path.with_suffix(suffix))
            else:
                self.path.with_suffix(suffix).unlink(missing_ok=True)

    def discard(self) -> None:
        super().discard()
        for suffix in COMPANIONS:
            self.tmp.with_suffix(suffix).unlink(missing_ok=True)
