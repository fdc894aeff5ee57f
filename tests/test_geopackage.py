"""GeoPackage writer: schema, metadata, areas in square metres, atomic replacement."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
from pyproj import Transformer
from shapely.geometry import Polygon, box
import shapely

from model.errors import UserError
from pipeline.geopackage import GeoPackageWriter, areas_m2


def test_layer_fields_crs_and_metadata_round_trip(tmp_path):
    out = tmp_path / "out.gpkg"
    x, y = 733600, 3724700  # Atlanta, UTM 16N
    ring = Polygon([(x, y), (x + 10, y), (x + 10, y + 10), (x, y + 10)],
                   [[(x + 3, y + 3), (x + 6, y + 3), (x + 6, y + 6), (x + 3, y + 6)]])
    with GeoPackageWriter(out, "EPSG:32616", metadata={"checkpoint": "m.pt", "tile": 512}) as writer:
        writer.write([ring], [1], ["building"], [0.75])
        writer.write([box(x + 20, y + 20, x + 25, y + 30)], [2], ["tree"], [0.5])
    frame = gpd.read_file(out)
    assert frame.crs.to_epsg() == 32616 and list(frame["class_name"]) == ["building", "tree"]
    assert list(frame["class_id"]) == [1, 2] and frame["score"].iloc[0] == pytest.approx(0.75)
    assert list(frame["area_m2"]) == pytest.approx([91.0, 50.0], rel=0.002)  # geodesic vs UTM scale factor
    assert set(frame.geom_type) == {"MultiPolygon"}
    meta = pyogrio.read_info(out)["layer_metadata"]
    assert json.loads(meta["aerial_seg_run"]) == {"checkpoint": "m.pt", "tile": 512}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]  # no temp or sidecar files


def test_geodesic_area_in_a_geographic_crs_matches_utm():
    square = box(733600, 3724700, 733700, 3724800)  # 100 m x 100 m in UTM 16N
    to_wgs84 = Transformer.from_crs("EPSG:32616", "EPSG:4326", always_xy=True).transform
    (utm,) = areas_m2([square], "EPSG:32616")
    (geo,) = areas_m2([shapely.transform(square, lambda xy: np.column_stack(to_wgs84(xy[:, 0], xy[:, 1])))],
                      "EPSG:4326")
    assert utm == pytest.approx(10_000, rel=0.002) and geo == pytest.approx(10_000, rel=0.005)
    (feet,) = areas_m2([box(700_000, 600_000, 700_100, 600_100)], "EPSG:2236")  # a US-feet projected CRS
    assert feet == pytest.approx(10_000 * 0.3048006**2, rel=1e-3)
    # Web Mercator at 45 degrees north: planar area is twice the truth (1 / cos^2 45); geodesic is right.
    merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    x0, y0 = merc.transform(10.0, 45.0)
    (mercator,) = areas_m2([box(x0, y0, x0 + 141.42, y0 + 141.42)], "EPSG:3857")
    assert mercator == pytest.approx(10_000, rel=0.01)


def test_failure_mid_write_keeps_the_previous_file(tmp_path):
    out = tmp_path / "out.gpkg"
    with GeoPackageWriter(out, "EPSG:32616") as writer:
        writer.write([box(0, 0, 1, 1)], [1], ["a"], [0.9])
    before = out.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with GeoPackageWriter(out, "EPSG:32616", overwrite=True) as writer:
            writer.write([box(0, 0, 2, 2)] * 3, [1] * 3, ["a"] * 3, [0.1] * 3)
            raise RuntimeError("disk full")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]
    with pytest.raises(UserError, match="exists"):
        GeoPackageWriter(out, "EPSG:32616").__enter__()


def test_empty_result_is_a_valid_layer(tmp_path):
    out = tmp_path / "empty.gpkg"
    with GeoPackageWriter(out, "EPSG:4326"):
        pass
    frame = gpd.read_file(out)
    assert len(frame) == 0 and {"class_name", "class_id", "score", "area_m2"} <= set(frame.columns)
    assert np.isclose(areas_m2([], "EPSG:4326"), []).all()
