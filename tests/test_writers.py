"""Output formats: one run written as GeoPackage, GeoParquet, FlatGeobuf, Shapefile and GeoJSON holds the same
rows, read back with geopandas, GDAL's ogrinfo and QGIS; each format skips an up-to-date rerun, resumes an
interrupted one and never leaves a partial file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow.parquet as pq
import pyogrio
import pytest
import shapely
from affine import Affine
from pyproj import CRS
from shapely.geometry import MultiPolygon

from core.errors import Interrupted, UserError
from pipeline import scene_run
from pipeline.batch import plan_tasks, run_scenes
from pipeline.cli import main
from pipeline.pool import RayPool
from pipeline.run import run_scene
from pipeline.settings import load_settings, settings_overrides
from pipeline.store import saved_tiles, state_dir
from pipeline.writers import WRITERS, writer_for
from pipeline.writers.shapefile import ShapefileWriter
from tests.oracle import OraclePredictor, paint_objects, write_scene
from tests.test_reliability import SlowOracle

TILE, OVERLAP = 128, 32
UTM = ("EPSG:32616", Affine(0.5, 0, 733600.0, 0, -0.5, 3725140.0))
FORMATS = [suffix[1:] for suffix in WRITERS]
# One CPU per model actor, so the module's pool and a test's own (slow) pool fit in the 2-CPU Ray.
OPTIONS = {"tile": TILE, "overlap": OVERLAP, "scaling": "divide255", "threads_per_worker": 1, "progress": False}
ATTRIBUTES = ["class_name", "class_id", "score", "area_m2"]
GEOJSON_TOLERANCE_M = 0.02  # RFC 7946 coordinates have 7 decimals of a degree: about a centimetre


@pytest.fixture(scope="module")
def pool(ray_session):
    with RayPool(OraclePredictor(), load_settings(None, settings_overrides({"threads_per_worker": 1}))) as shared:
        yield shared


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    write_scene(path, *paint_objects(260, 300, TILE, OVERLAP), *UTM)
    return path


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, scene, pool) -> dict[str, Path]:
    """The same run in every format; each output under its own name (each has its own report and style)."""
    root = tmp_path_factory.mktemp("outputs")
    written = {}
    for name in FORMATS:
        out = root / f"objects-{name}.{name}"
        summary = run_scene(str(scene), out, predictor=OraclePredictor(), pool=pool, **OPTIONS)
        assert summary.complete and summary.merged_instances > 5 and summary.output == str(out)
        written[name] = out
    return written


def read(path: Path) -> gpd.GeoDataFrame:
    return gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(path)


@pytest.fixture(scope="module")
def reference(outputs) -> gpd.GeoDataFrame:
    return read(outputs["gpkg"])


def assert_same_rows(frame: gpd.GeoDataFrame, reference: gpd.GeoDataFrame, tolerance: float = 0.0) -> None:
    """Same rows as the GeoPackage's, in any order: attributes exact (scores as float32), geometries within
    `tolerance` map units (Hausdorff distance) once in the GeoPackage's CRS."""
    frame = frame.to_crs(reference.crs)
    assert len(frame) == len(reference) and list(frame.columns[:4]) == ATTRIBUTES
    ours = frame.sort_values("area_m2").reset_index(drop=True)
    theirs = reference.sort_values("area_m2").reset_index(drop=True)
    assert list(ours["class_name"]) == list(theirs["class_name"])
    assert list(ours["class_id"]) == list(theirs["class_id"])
    assert np.allclose(ours["score"], theirs["score"], rtol=0, atol=1e-7)
    assert np.allclose(ours["area_m2"], theirs["area_m2"], rtol=1e-12, atol=0)
    distances = shapely.hausdorff_distance(ours.geometry.values, theirs.geometry.values)
    assert distances.max() <= tolerance, distances
    if not tolerance:  # the same vertices (a Shapefile reads a one-part MultiPolygon back as a Polygon)
        multi = [g if g.geom_type == "MultiPolygon" else MultiPolygon([g]) for g in ours.geometry]
        assert all(shapely.equals_exact(shapely.normalize(multi), theirs.geometry.normalize().values, 0))


@pytest.mark.parametrize("name", [f for f in FORMATS if f != "gpkg"])
def test_every_format_holds_the_geopackage_rows(outputs, reference, name):
    frame = read(outputs[name])
    if name == "geojson":
        assert frame.crs.to_epsg() == 4326 and frame.total_bounds[0] == pytest.approx(-84.48, abs=0.01)
    else:
        assert frame.crs == reference.crs
    assert_same_rows(frame, reference, GEOJSON_TOLERANCE_M if name == "geojson" else 0.0)
    if name == "shp":  # every field name fits a .dbf as it is
        assert list(pyogrio.read_info(outputs[name])["fields"]) == ATTRIBUTES


def ogrinfo(path: Path, *options: str) -> str:
    """What `ogrinfo [options] PATH LAYER` prints about the output's (first) layer."""
    if shutil.which("ogrinfo") is None:
        pytest.skip("GDAL's ogrinfo is not installed (apt-get install gdal-bin)")
    if path.suffix == ".parquet" and "Parquet" not in pyogrio.list_drivers():
        pytest.skip("this GDAL has no Parquet driver (the GeoParquet writer does not need one)")
    layer = pyogrio.list_layers(path)[0][0]
    return subprocess.run(["ogrinfo", *options, str(path), layer], check=True, capture_output=True, text=True).stdout


def ogrinfo_features(path: Path) -> gpd.GeoDataFrame:
    """ogrinfo's listing of the features parsed: one row per OGRFeature block, its fields and WKT geometry."""
    rows = []
    for block in re.split(r"\nOGRFeature\([^)]*\):\d+\n", ogrinfo(path))[1:]:
        row = dict(re.findall(r"^  (\w+) \(.*?\) = (.*)$", block, re.M))  # class_id (Integer) = 1
        wkt = re.search(r"^  ((?:MULTI)?POLYGON .*)$", block, re.M).group(1)
        rows.append({"class_name": row["class_name"], "class_id": int(row["class_id"]),
                     "score": float(row["score"]), "area_m2": float(row["area_m2"]),
                     "geometry": shapely.from_wkt(wkt)})
    return gpd.GeoDataFrame(rows, crs=pyogrio.read_info(path)["crs"])


@pytest.mark.parametrize("name", FORMATS)
def test_ogrinfo_reads_the_same_rows(outputs, reference, name):
    path = outputs[name]
    summary = ogrinfo(path, "-so")
    assert f"Feature Count: {len(reference)}" in summary
    for field, kind in [("class_name", "String"), ("class_id", "Integer"), ("score", "Real"), ("area_m2", "Real")]:
        assert re.search(rf"^{field}: {kind}\b", summary, re.M), (field, summary)
    assert ('ID["EPSG",4326]' if name == "geojson" else 'ID["EPSG",32616]') in summary
    # ogrinfo prints reals with 15 significant digits
    frame = ogrinfo_features(path)
    assert len(frame) == len(reference)
    assert_same_rows(frame.assign(area_m2=np.round(frame["area_m2"], 6)),
                     reference.assign(area_m2=np.round(reference["area_m2"], 6)),
                     GEOJSON_TOLERANCE_M if name == "geojson" else 1e-6)


def test_flatgeobuf_has_its_spatial_index(outputs):
    info = pyogrio.read_info(outputs["fgb"])
    assert info["capabilities"]["fast_spatial_filter"] and info["features"] > 0


def test_geoparquet_declares_version_crs_and_its_bbox_covering(outputs, reference):
    file = pq.ParquetFile(outputs["parquet"])
    geo = json.loads(file.schema_arrow.metadata[b"geo"])
    column = geo["columns"]["geometry"]
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry" and column["encoding"] == "WKB"
    assert column["geometry_types"] == ["MultiPolygon"] and CRS.from_json_dict(column["crs"]) == CRS(UTM[0])
    assert column["covering"] == {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}
    table = file.read()
    boxes = np.array([[b[k] for k in ("xmin", "ymin", "xmax", "ymax")] for b in table["bbox"].to_pylist()])
    assert np.array_equal(boxes, shapely.bounds(shapely.from_wkb(table["geometry"].to_pylist())))
    group = file.metadata.row_group(0)  # readers prune row groups by the bbox columns' statistics
    stats = {group.column(i).path_in_schema: group.column(i).statistics for i in range(group.num_columns)}
    assert stats["bbox.xmin"].min == boxes[:, 0].min() and stats["bbox.ymax"].max == boxes[:, 3].max()
    run = json.loads(file.metadata.metadata[b"aerial_seg_run"])  # what produced it, as the report says
    report = json.loads(outputs["parquet"].with_name("objects-parquet.report.json").read_text())
    assert run["complete"] is True and run["result_fingerprint"] == report["result_fingerprint"]
    assert run["pipeline_config"] == report["pipeline_config"]


def test_geoparquet_row_groups_are_written_as_batches_come(tmp_path, scene, pool, reference, monkeypatch):
    monkeypatch.setattr(scene_run, "WRITE_BATCH", 3)
    out = tmp_path / "small-groups.parquet"
    run_scene(str(scene), out, predictor=OraclePredictor(), pool=pool, **OPTIONS)
    meta = pq.ParquetFile(out).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert len(sizes) >= 3 and max(sizes) <= 3 and sum(sizes) == len(reference)
    assert_same_rows(read(out), reference)


@pytest.mark.parametrize("name", [f for f in FORMATS if f != "gpkg"])
def test_each_output_has_the_geopackage_style_beside_it(outputs, name):
    with sqlite3.connect(outputs["gpkg"]) as db:
        (stored,) = db.execute("SELECT styleQML FROM layer_styles").fetchone()
    assert outputs[name].with_suffix(".qml").read_text() == stored  # same colours per class, same renderer
    assert not outputs["gpkg"].with_suffix(".qml").exists()  # GeoPackage keeps its style inside


QGIS_PROBE = textwrap.dedent("""
    import json, os, sys
    from osgeo import ogr
    from qgis.core import QgsApplication, QgsVectorLayer
    app = QgsApplication([], False)
    app.initQgis()
    found = {"parquet_driver": ogr.GetDriverByName("Parquet") is not None}
    for path in sys.argv[1:]:
        layer = QgsVectorLayer(path, "objects", "ogr")
        info = found[path] = {"valid": layer.isValid()}
        if layer.isValid():
            renderer = layer.renderer()
            info.update(count=layer.featureCount(), renderer=renderer.type(), crs=layer.crs().authid(),
                        attr=renderer.classAttribute(),
                        categories={c.value(): c.symbol().symbolLayer(0).strokeColor().name()
                                    for c in renderer.categories()},
                        rows=[[f[a] for a in ("class_name", "class_id", "score", "area_m2")] + [f.geometry().asWkt()]
                              for f in layer.getFeatures()])
    print(json.dumps(found), flush=True)
    os._exit(0)  # QGIS 3.22 may crash in its own teardown (exitQgis) once the work is done
""")


def qgis_python() -> str | None:
    """This Python if it imports qgis, else the system's (QGIS installs its bindings there)."""
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
        if shutil.which(python) and subprocess.run([python, "-c", "import qgis.core"], capture_output=True).returncode == 0:
            return python
    return None


@pytest.fixture(scope="module")
def qgis_view(outputs) -> dict:
    python = qgis_python()
    if python is None:
        pytest.skip("QGIS's Python bindings (qgis) are not installed")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    env.pop("PYTHONPATH", None)  # the system's Python with its own packages
    done = subprocess.run([python, "-c", QGIS_PROBE, *map(str, outputs.values())], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", FORMATS)
def test_qgis_opens_each_format_styled(outputs, reference, qgis_view, name):
    if name == "parquet" and not qgis_view["parquet_driver"]:
        pytest.skip("this QGIS's GDAL has no Parquet driver")
    layer = qgis_view[str(outputs[name])]
    assert layer["valid"] and layer["count"] == len(reference)
    assert layer["crs"] == ("EPSG:4326" if name == "geojson" else "EPSG:32616")
    assert layer["renderer"] == "categorizedSymbol" and layer["attr"] == "class_name"
    assert layer["categories"] == {"building": "#ff2828", "tree": "#28dcff"}  # style.PALETTE's classes 1, 2
    frame = gpd.GeoDataFrame([dict(zip(ATTRIBUTES, row[:4]), geometry=shapely.from_wkt(row[4]))
                              for row in layer["rows"]], crs=layer["crs"])
    assert_same_rows(frame, reference, GEOJSON_TOLERANCE_M if name == "geojson" else 1e-6)


def output_files(path: Path) -> dict[str, int]:
    """Every file of the output with its modification time."""
    return {p.name: p.stat().st_mtime_ns for p in writer_for(path).files(path) if p.exists()}


@pytest.mark.parametrize("name", FORMATS)
def test_a_rerun_is_up_to_date_and_rewrites_nothing(scene, outputs, pool, name):
    before = output_files(outputs[name])
    summary = run_scene(str(scene), outputs[name], predictor=OraclePredictor(), pool=pool, **OPTIONS)
    assert summary.up_to_date and "up to date" in summary.lines()[0]
    assert output_files(outputs[name]) == before
    with pytest.raises(UserError, match="exists"):  # other options: not silently replaced
        run_scene(str(scene), outputs[name], predictor=OraclePredictor(), pool=pool,
                  **{**OPTIONS, "score_threshold": 0.95})


def test_a_report_of_another_output_of_the_same_name_is_not_taken_for_its_record(tmp_path, scene, outputs, pool):
    """x.fgb and x.shp share x.report.json: the report names the output it describes."""
    for name in ("fgb", "shp"):
        run_scene(str(scene), tmp_path / f"x.{name}", predictor=OraclePredictor(), pool=pool, **OPTIONS)
    with pytest.raises(UserError, match="exists"):  # the report is the .shp's now: the .fgb's run is unknown
        run_scene(str(scene), tmp_path / "x.fgb", predictor=OraclePredictor(), pool=pool, **OPTIONS)
    assert run_scene(str(scene), tmp_path / "x.shp", predictor=OraclePredictor(), pool=pool, **OPTIONS).up_to_date


@contextlib.contextmanager
def ctrl_c_when(condition, seconds: float = 60.0):
    """Interrupt this (main) thread as Ctrl-C would, once `condition()` holds, while the block runs."""
    armed = threading.Event()
    armed.set()

    def handler(signum, frame):
        if armed.is_set():
            raise KeyboardInterrupt

    def watch():
        deadline = time.time() + seconds
        while armed.is_set() and time.time() < deadline:
            if condition():
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.02)

    previous = signal.signal(signal.SIGUSR1, handler)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield
    finally:
        armed.clear()
        watcher.join()
        signal.signal(signal.SIGUSR1, previous)


def writing(out: Path) -> bool:
    """The output is open: its temporary file is there, or the thread streaming into the GDAL driver (which
    writes a FlatGeobuf only when it closes) runs."""
    return (any(out.parent.glob(f".{out.name}.*.partial*"))
            or any(t.name == f"write {out.name}" for t in threading.enumerate()))


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def grid_scene(tmp_path_factory, pool) -> tuple[Path, gpd.GeoDataFrame]:
    """A 3 x 3-window scene with an object in the middle of each window, where no other window sees it: its
    rows are final as soon as its window is done, so the output is open and written to while tiles come.
    With the rows of a run that nothing stopped."""
    root = tmp_path_factory.mktemp("grid")
    ids = np.zeros((320, 320), np.uint8)
    for k, (row, col) in enumerate((r, c) for r in (64, 160, 256) for c in (64, 160, 256)):
        ids[row - 5:row + 5, col - 4:col + 4] = k + 1
    write_scene(root / "grid.tif", ids, np.where(ids > 0, 1 + ids % 2, 0).astype(np.uint8), *UTM)
    run_scene(str(root / "grid.tif"), root / "grid.gpkg", predictor=OraclePredictor(), pool=pool, **OPTIONS)
    return root / "grid.tif", read(root / "grid.gpkg")


@pytest.fixture(scope="module")
def slow_pool(ray_session, tmp_path_factory):
    """Model workers slow enough (0.3 s a tile) to be interrupted mid-run."""
    slow = SlowOracle(0.3, str(tmp_path_factory.mktemp("pids")))
    with RayPool(slow, load_settings(None, settings_overrides({"threads_per_worker": 1}))) as workers:
        yield slow, workers


@pytest.mark.parametrize("name", FORMATS)
def test_an_interrupted_run_leaves_no_output_and_the_rerun_completes(tmp_path, grid_scene, slow_pool, name,
                                                                     monkeypatch):
    scene, reference = grid_scene
    slow, workers = slow_pool
    monkeypatch.setattr(scene_run, "WRITE_BATCH", 1)  # each window's rows written as they come
    out = tmp_path / f"cut.{name}"
    store = state_dir(out)
    with ctrl_c_when(lambda: writing(out) and saved_tiles(store) >= 2):
        with pytest.raises(Interrupted, match=r"\d of 9 tiles saved"):
            run_scene(str(scene), out, predictor=slow, pool=workers, batch_size=1, **OPTIONS)
    assert not [p for p in writer_for(out).files(out) if p.exists()]  # no output, no style, no .dbf ...
    assert hidden(tmp_path) == [store.name]  # nothing half-written, no lock: only the saved tiles
    saved = saved_tiles(store)

    summary = run_scene(str(scene), out, predictor=slow, pool=workers, batch_size=1, **OPTIONS)
    assert summary.complete and summary.tiles_resumed == saved
    assert_same_rows(read(out), reference, GEOJSON_TOLERANCE_M if name == "geojson" else 0.0)
    assert hidden(tmp_path) == []  # the saved tiles go with a complete output


def test_a_shapefile_over_2_gb_is_refused_in_one_line_and_leaves_nothing(tmp_path, scene, outputs, pool,
                                                                          monkeypatch):
    written = max(outputs["shp"].stat().st_size, outputs["shp"].with_suffix(".dbf").stat().st_size)
    monkeypatch.setattr(ShapefileWriter, "limit", written - 1)  # the bound holds what GDAL writes
    out = tmp_path / "big.shp"
    with pytest.raises(UserError, match=r"more than a Shapefile holds .* write \.gpkg, \.fgb or \.parquet") as caught:
        run_scene(str(scene), out, predictor=OraclePredictor(), pool=pool, **OPTIONS)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".tiles")) == []
    monkeypatch.setattr(ShapefileWriter, "limit", int(written * 1.1) + 200)  # and it is tight
    assert run_scene(str(scene), out, predictor=OraclePredictor(), pool=pool, **OPTIONS).complete


@pytest.fixture(scope="module")
def two_scenes(tmp_path_factory, scene) -> list[str]:
    other = tmp_path_factory.mktemp("second") / "south field.tif"
    write_scene(other, *paint_objects(150, 140, TILE, OVERLAP), "EPSG:3857",
                Affine(0.3, 0, -9393000.0, 0, -0.3, 3997000.0))
    return [str(scene), str(other)]


def test_many_scenes_in_a_format_without_layers_make_one_file_per_scene(tmp_path, two_scenes, pool):
    settings = load_settings(None, settings_overrides({"format": "parquet"}))
    with pytest.raises(UserError, match=r"GeoParquet file holds one scene; .* --out-dir DIR --format parquet"):
        plan_tasks(two_scenes, settings, output=tmp_path / "all.parquet")
    summaries = list(run_scenes(two_scenes, OraclePredictor(), pool, out_dir=tmp_path, format="parquet",
                                **OPTIONS))
    outputs = [tmp_path / "scene.parquet", tmp_path / "south field.parquet"]
    assert [s.output for s in summaries] == [str(o) for o in outputs] and all(s.layer == "" for s in summaries)
    for out, summary in zip(outputs, summaries):
        assert len(read(out)) == summary.merged_instances > 0 and out.with_suffix(".qml").exists()
    assert read(outputs[1]).crs.to_epsg() == 3857
    again = list(run_scenes(two_scenes, OraclePredictor(), pool, out_dir=tmp_path, format="parquet",
                            **OPTIONS))
    assert all(s.up_to_date for s in again)


def test_bad_formats_are_refused_in_one_line(tmp_path, scene, capsys):
    with pytest.raises(UserError, match=r"suffix chooses its format, one of \.gpkg, \.parquet, \.fgb, \.shp, "
                                        r"\.geojson \(got \.csv\)"):
        run_scene(str(scene), tmp_path / "out.csv", predictor=OraclePredictor(), **OPTIONS)
    with pytest.raises(UserError, match="format must be one of gpkg, parquet"):
        load_settings(None, settings_overrides({"format": "kml"}))
    code = main(["run", str(scene), "-o", str(tmp_path / "x.fgb"), "--format", "fgb"])
    assert code == 2 and "--format names the files of --out-dir" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
