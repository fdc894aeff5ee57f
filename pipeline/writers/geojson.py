"""GeoJSON output (RFC 7946): coordinates reprojected to longitude/latitude on WGS 84, for small outputs.

RFC 7946 allows no other CRS, so GDAL reprojects every polygon to EPSG:4326 as it writes it (7 decimals,
about 1 cm) and orients rings as the RFC asks. GeoJSON has no spatial index and is read whole by most
tools: fine for a few thousand objects, slow beyond. It has no metadata of ours: the run report beside the
output is the record of what produced it.
"""

from __future__ import annotations

from pipeline.writers.ogr import StreamWriter


class GeoJSONWriter(StreamWriter):
    title = "GeoJSON"
    driver = "GeoJSON"
    layer_options = {"RFC7946": "YES"}
