"""GeoPackage writer: schema, metadata, areas in square metres, streaming appends, atomic replacement."""

from __future__ import annotations

import json
import sqlite3

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely
from pyproj import Transformer
from shapely.geometry import MultiPolygon, Polygon, box

from core.errors import UserError
from pipeline.features import AreaMeter, Rows
from pipeline.writers.geopackage import METADATA_KEY, GeoPackageWriter

X, Y = 733_600, 3_724_700  # Atlanta, UTM 16N
SCHEMA = {"class_name": "object", "class_id": "int32", "score": "float32", "area_m2": "float64"}


def areas_m2(geoms, crs) -> np.ndarray:
    geoms = np.array(list(geoms), dtype=object)
    centre = shapely.get_coordinates(geoms[0].representative_point())[0] if len(geoms) else (0.0, 0.0)
    return AreaMeter(crs, tuple(centre)).areas(geoms)


def rows(geoms, class_ids, scores, crs="EPSG:32616") -> Rows:
    geoms = np.array([g if g.geom_type == "MultiPolygon" else MultiPolygon([g]) for g in geoms], dtype=object)
    centre = tuple(shapely.get_coordinates(geoms[0].representative_point())[0])
    return Rows.of([(0, k) for k in range(len(geoms))], geoms, class_ids, scores, AreaMeter(crs, centre))


def schema(path) -> dict[str, str]:
    info = pyogrio.read_info(path)
    return dict(zip(info["fields"], info["dtypes"]))


def test_round_trip_of_two_appended_batches(tmp_path):
    out = tmp_path / "out.gpkg"
    ring = Polygon([(X, Y), (X + 10, Y), (X + 10, Y + 10), (X, Y + 10)],
                   [[(X + 3, Y + 3), (X + 6, Y + 3), (X + 6, Y + 6), (X + 3, Y + 6)]])
    two_parts = MultiPolygon([box(X + 20, Y, X + 22, Y + 5), box(X + 30, Y, X + 33, Y + 5)])
    with GeoPackageWriter(out, "EPSG:32616", metadata={"checkpoint": "m.pt"}) as writer:
        writer.write(rows([ring, two_parts], [1, 1], [0.75, 0.6]), ["building", "building"])
        writer.write(rows([box(X + 20, Y + 20, X + 25, Y + 30)], [2], [0.5]), ["tree"])
        assert not out.exists()  # nothing under the final name before the end
    frame = gpd.read_file(out)
    assert frame.crs.to_epsg() == 32616 and schema(out) == SCHEMA
    assert list(frame["class_name"]) == ["building", "building", "tree"] and list(frame["class_id"]) == [1, 1, 2]
    assert list(frame["score"]) == pytest.approx([0.75, 0.6, 0.5])
    assert list(frame["area_m2"]) == pytest.approx([91.0, 25.0, 50.0], rel=0.003)  # UTM scale factor here
    assert pyogrio.read_info(out)["geometry_type"] == "MultiPolygon" and set(frame.geom_type) == {"MultiPolygon"}
    assert frame.geometry.iloc[0].equals(MultiPolygon([ring])) and frame.geometry.iloc[1].equals(two_parts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]  # no temporary or sidecar files


def test_metadata_is_stored_in_the_geopackage(tmp_path):
    out = tmp_path / "out.gpkg"
    metadata = {"checkpoint": "/models/swin_t.pt", "config": {"tile": 512, "overlap": 64}, "counts": {"tiles": 9}}
    with GeoPackageWriter(out, "EPSG:32616", metadata=metadata) as writer:
        writer.write(rows([box(X, Y, X + 1, Y + 1)], [1], [0.9]), ["a"])
    assert json.loads(pyogrio.read_info(out)["layer_metadata"][METADATA_KEY]) == metadata
    with sqlite3.connect(out) as db:  # inside the file, in GeoPackage's own metadata table
        stored = [row[0] for row in db.execute("SELECT metadata FROM gpkg_metadata")]
    assert any("/models/swin_t.pt" in text for text in stored)


def test_empty_result_is_a_valid_layer_with_its_schema(tmp_path):
    out = tmp_path / "empty.gpkg"
    with GeoPackageWriter(out, "EPSG:4326", layer="crowns", metadata={"instances": 0}):
        pass
    info = pyogrio.read_info(out, layer="crowns")
    assert info["features"] == 0 and info["geometry_type"] == "MultiPolygon" and schema(out) == SCHEMA
    assert gpd.read_file(out, layer="crowns").crs.to_epsg() == 4326
    assert json.loads(info["layer_metadata"][METADATA_KEY]) == {"instances": 0}


def test_failure_mid_stream_removes_the_partial_file_and_keeps_the_previous_one(tmp_path):
    out = tmp_path / "out.gpkg"
    with GeoPackageWriter(out, "EPSG:32616") as writer:
        writer.write(rows([box(X, Y, X + 1, Y + 1)], [1], [0.9]), ["a"])
    before = out.read_bytes()
    with pytest.raises(RuntimeError, match="interrupted"):
        with GeoPackageWriter(out, "EPSG:32616", overwrite=True) as writer:
            writer.write(rows([box(X, Y, X + 2, Y + 2)] * 3, [1] * 3, [0.1] * 3), ["a"] * 3)
            raise RuntimeError("interrupted")
    assert out.read_bytes() == before
    with pytest.raises(ValueError):  # the writer itself fails on its second batch
        with GeoPackageWriter(out, "EPSG:32616", overwrite=True) as writer:
            writer.write(rows([box(X, Y, X + 2, Y + 2)], [1], [0.1]), ["a"])
            writer.write(rows([box(X, Y, X + 2, Y + 2)] * 2, [1, 1], [0.1, 0.1]), ["a"])  # one name for two rows
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]
    new = tmp_path / "new.gpkg"
    with pytest.raises(KeyboardInterrupt):
        with GeoPackageWriter(new, "EPSG:32616") as writer:
            writer.write(rows([box(X, Y, X + 2, Y + 2)], [1], [0.1]), ["a"])
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gpkg"]


def test_an_existing_file_needs_overwrite(tmp_path):
    out = tmp_path / "out.gpkg"
    out.write_bytes(b"previous")
    with pytest.raises(UserError, match="exists"):
        with GeoPackageWriter(out, "EPSG:32616"):
            pass
    assert out.read_bytes() == b"previous"
    with GeoPackageWriter(out, "EPSG:32616", overwrite=True) as writer:
        writer.write(rows([box(X, Y, X + 1, Y + 1)], [1], [0.9]), ["a"])
    assert len(gpd.read_file(out)) == 1


def test_areas_are_square_metres_in_projected_and_geographic_crs():
    square = box(X, Y, X + 100, Y + 100)  # 100 m x 100 m in UTM 16N
    to_wgs84 = Transformer.from_crs("EPSG:32616", "EPSG:4326", always_xy=True).transform
    in_degrees = shapely.transform(square, lambda xy: np.column_stack(to_wgs84(xy[:, 0], xy[:, 1])))
    (utm,) = areas_m2([square], "EPSG:32616")
    (geo,) = areas_m2([in_degrees], "EPSG:4326")
    assert utm == pytest.approx(10_000, rel=0.003) and geo == pytest.approx(utm, rel=0.005)
    # A US-survey-feet CRS (Florida East): 100 ft x 100 ft on its central meridian, where its scale is ~1.
    (feet,) = areas_m2([box(656_166, 600_000, 656_266, 600_100)], "EPSG:2236")
    assert feet == pytest.approx(10_000 * (1200 / 3937) ** 2, rel=1e-3)
    # Web Mercator at 45 degrees north: planar area is twice the truth (1 / cos^2 45).
    merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    x0, y0 = merc.transform(10.0, 45.0)
    (mercator,) = areas_m2([box(x0, y0, x0 + 141.42, y0 + 141.42)], "EPSG:3857")
    assert mercator == pytest.approx(10_000, rel=0.01)
    ring = box(X, Y, X + 10, Y + 10).difference(box(X + 3, Y + 3, X + 6, Y + 6))
    assert areas_m2([ring, MultiPolygon([ring])], "EPSG:32616") == pytest.approx([91.0, 91.0], rel=0.003)
    assert areas_m2([], "EPSG:4326").shape == (0,)


def test_areas_match_the_geodesic_area_anywhere_in_a_batch():
    # A batch spanning a continent (the projection is centred on the first polygon): every area still
    # matches the area on the ellipsoid, including one across the antimeridian and one near the pole.
    from pyproj import Geod

    cells = [box(10, 0, 10.01, 0.01), box(40, 60, 40.02, 60.01), box(-70, -50, -69.99, -49.99),
             box(179.995, 20, 180.005, 20.01), box(-10, 85, -9.9, 85.01)]
    expected = [abs(Geod(ellps="WGS84").geometry_area_perimeter(shapely.orient_polygons(c))[0]) for c in cells]
    assert areas_m2(cells, "EPSG:4326") == pytest.approx(expected, rel=1e-6)


def test_an_empty_geometry_has_zero_area():
    empty = MultiPolygon()
    square = box(X, Y, X + 100, Y + 100)
    meter = AreaMeter("EPSG:32616", (X, Y))
    assert list(meter.areas(np.array([empty, square]))) == pytest.approx([0.0, 10_000], rel=0.003)
    assert list(meter.areas(np.array([empty]))) == [0.0]


def test_the_area_projection_is_centred_on_the_scene_and_pickles_without_pyproj_objects():
    import pickle

    meter = AreaMeter("EPSG:32616", (X, Y))
    square = box(X, Y, X + 100, Y + 100)
    far = box(X + 30_000, Y + 30_000, X + 30_100, Y + 30_100)  # 42 km from the centre: still exact
    before = meter.areas(np.array([square, far]))
    copy = pickle.loads(pickle.dumps(meter))
    assert "project" not in copy.__dict__ and list(copy.areas(np.array([square, far]))) == list(before)


def test_each_layer_carries_a_default_qgis_style_with_a_colour_per_class(tmp_path):
    import xml.etree.ElementTree as ET

    from pipeline.style import PALETTE

    out = tmp_path / "out.gpkg"
    with GeoPackageWriter(out, "EPSG:32616", layer="north", class_names=["building", "tree"]) as writer:
        writer.write(rows([box(X, Y, X + 1, Y + 1)], [1], [0.9]), ["building"])
    for _ in range(2):  # a second layer; the same layer again replaces its style row, never duplicates it
        with GeoPackageWriter(out, "EPSG:32616", layer="south", keep_other_layers=True) as writer:
            writer.write(rows([box(X, Y, X + 1, Y + 1)] * 2, [3, 1], [0.9, 0.8]), ["car", "building"])
    assert [name for name, _ in pyogrio.list_layers(out)] == ["north", "south", "layer_styles"]
    with sqlite3.connect(out) as db:
        styles = db.execute("SELECT f_table_name, f_geometry_column, useAsDefault, styleQML FROM layer_styles "
                          "ORDER BY f_table_name").fetchall()
        registered = db.execute("SELECT data_type FROM gpkg_contents WHERE table_name = 'layer_styles'").fetchone()
    assert registered == ("attributes",)  # a user table registered as the GeoPackage standard asks
    assert [(r[0], r[1], r[2]) for r in styles] == [("north", "geom", 1), ("south", "geom", 1)]
    for (layer, _, _, qml), classes in zip(styles, [{"building": 1, "tree": 2}, {"building": 1, "car": 3}]):
        root = ET.fromstring(qml.split("\n", 1)[1])
        renderer = root.find("renderer-v2")
        assert renderer.get("type") == "categorizedSymbol" and renderer.get("attr") == "class_name"
        categories = {c.get("value"): c.get("symbol") for c in renderer.iter("category")}
        assert set(categories) == set(classes)
        for value, symbol in categories.items():
            layer_props = renderer.find(f"symbols/symbol[@name='{symbol}']/layer")
            props = {p.get("k"): p.get("v") for p in layer_props.iter("prop")}
            rgb = ",".join(str(int(v)) for v in PALETTE[classes[value] - 1])
            assert props["outline_color"] == f"{rgb},255" and props["color"].startswith(rgb)
