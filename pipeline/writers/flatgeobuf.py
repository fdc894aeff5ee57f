"""FlatGeobuf output: one file that web maps read in parts over HTTP, with its packed Hilbert R-tree index.

GDAL writes the features to a temporary file of its own and, at close, sorts them along a Hilbert curve
and writes the index before them, so the file is complete only when the writer closes. GDAL 3.12's
FlatGeobuf driver writes no key-value metadata: the run report beside the output is the record of what
produced it.
"""

from __future__ import annotations

from pipeline.writers.ogr import StreamWriter


class FlatGeobufWriter(StreamWriter):
    title = "FlatGeobuf"
    driver = "FlatGeobuf"
    layer_options = {"SPATIAL_INDEX": "YES"}
