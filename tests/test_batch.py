"""Many scenes in one job: globs and manifests, one file per scene or a layer per scene, reruns that skip
what is done."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from affine import Affine

from core.errors import UserError
from pipeline.batch import run_scenes, work_file
from pipeline.pool import RayPool
from pipeline.scenes import expand_scenes, scene_name, unique_names
from pipeline.settings import load_settings
from tests.oracle import OraclePredictor, paint_objects, write_scene

TILE, OVERLAP = 128, 32
OPTIONS = {"tile": TILE, "overlap": OVERLAP, "scaling": "divide255", "progress": False}


@pytest.fixture(scope="module")
def pool(ray_session):
    with RayPool(OraclePredictor(), load_settings(None)) as shared:
        yield shared


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[str]:
    """Three scenes of different sizes and CRSs in one folder."""
    root = tmp_path_factory.mktemp("scenes")
    specs = [("north-field", 200, 260, "EPSG:32616", Affine(0.5, 0, 733600.0, 0, -0.5, 3725140.0)),
             ("south field", 150, 140, "EPSG:3857", Affine(0.3, 0, -9393000.0, 0, -0.3, 3997000.0)),
             ("east", 260, 180, "EPSG:32616", Affine(0.5, 0, 734000.0, 0, -0.5, 3725140.0))]
    paths = []
    for name, height, width, crs, transform in specs:
        ids, classes = paint_objects(height, width, TILE, OVERLAP)
        path = root / f"{name}.tif"
        write_scene(path, ids, classes, crs, transform)
        paths.append(str(path))
    return paths


def objects(path: Path, layer: str) -> list[tuple]:
    frame = pyogrio.read_dataframe(path, layer=layer)
    return sorted((r.class_id, round(r.geometry.area, 6), round(r.geometry.centroid.x, 6)) for r in frame.itertuples())


def test_globs_and_manifests_expand_to_scenes(tmp_path, scenes):
    folder = Path(scenes[0]).parent
    assert expand_scenes([str(folder / "*.tif")]) == sorted(scenes)
    manifest = tmp_path / "scenes.txt"
    manifest.write_text(f"# survey 2026\n{scenes[2]}\n\n{Path(scenes[0]).name}  # relative to a copy below\n")
    (tmp_path / Path(scenes[0]).name).write_bytes(Path(scenes[0]).read_bytes())
    assert expand_scenes([str(manifest), scenes[2]]) == [scenes[2], str(tmp_path / Path(scenes[0]).name)]
    with pytest.raises(UserError, match="no file matches"):
        expand_scenes([str(folder / "*.jp2")])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n")
    with pytest.raises(UserError, match="empty"):
        expand_scenes([str(empty)])
    assert [scene_name(s) for s in scenes] == ["north_field", "south_field", "east"]
    assert scene_name("/data/gpkg_contents.tif") == "scene_gpkg_contents"
    with pytest.raises(UserError, match="both be written as 'a_b'"):
        unique_names(["x/a-b.tif", "y/a b.tif"])


def test_one_geopackage_per_scene_and_a_rerun_skips_them(tmp_path, scenes, pool):
    summaries = list(run_scenes(scenes, OraclePredictor(), pool, out_dir=tmp_path, **OPTIONS))
    outputs = [tmp_path / f"{Path(s).stem}.gpkg" for s in scenes]
    assert [s.output for s in summaries] == [str(o) for o in outputs]
    for scene, out, summary in zip(scenes, outputs, summaries):
        layer = scene_name(scene)
        assert pyogrio.list_layers(out)[0][0] == layer  # the feature layer first, then the style table
        assert len(objects(out, layer)) == summary.merged_instances > 0
        assert (tmp_path / f"{Path(scene).stem}.quicklook.png").exists()
    stamps = [o.stat().st_mtime_ns for o in outputs]

    again = list(run_scenes(scenes, OraclePredictor(), pool, out_dir=tmp_path, **OPTIONS))
    assert all(s.up_to_date for s in again) and "up to date" in again[0].lines()[0]
    assert [o.stat().st_mtime_ns for o in outputs] == stamps
    with pytest.raises(UserError, match="exists"):  # other options: the old result is not silently replaced
        list(run_scenes(scenes, OraclePredictor(), pool, out_dir=tmp_path, **{**OPTIONS, "score_threshold": 0.95}))


def test_one_file_with_a_layer_per_scene_resumes_after_an_interruption(tmp_path, scenes, pool):
    single = tmp_path / "single"
    single.mkdir()
    expected = {}
    for summary in run_scenes(scenes, OraclePredictor(), pool, out_dir=single, **OPTIONS):
        expected[summary.layer] = objects(Path(summary.output), summary.layer)

    out = tmp_path / "all.gpkg"
    job = run_scenes(scenes, OraclePredictor(), pool, output=out, **OPTIONS)
    first = next(job)
    job.close()  # the job stops after the first scene (Ctrl-C): scenes already written stay in the work file
    assert not out.exists() and work_file(out).exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p != work_file(out) and p.name.endswith((".partial.gpkg", ".lock"))]
    assert not leftovers  # no half-written layer, no lock: only the work file and saved tiles stay

    summaries = list(run_scenes(scenes, OraclePredictor(), pool, output=out, **OPTIONS))
    done = [s.up_to_date for s in summaries]
    assert done[0] and done == sorted(done, reverse=True) and first.layer == summaries[0].layer
    assert not work_file(out).exists()
    layers = [name for name, _ in pyogrio.list_layers(out)]
    assert sorted(layers) == sorted([*expected, "layer_styles"])
    for layer, truth in expected.items():
        assert objects(out, layer) == truth
        assert (tmp_path / f"all.{layer}.report.json").exists()
    with sqlite3.connect(out) as db:
        styled = sorted(r[0] for r in db.execute("SELECT f_table_name FROM layer_styles WHERE useAsDefault"))
    assert styled == sorted(expected)
    with pytest.raises(UserError, match="exists"):
        next(run_scenes(scenes, OraclePredictor(), pool, output=out, **OPTIONS))


def test_scenes_that_would_share_an_output_are_refused(tmp_path, scenes, pool):
    other = tmp_path / "copy"
    other.mkdir()
    twin = other / Path(scenes[0]).name
    twin.write_bytes(Path(scenes[0]).read_bytes())
    with pytest.raises(UserError, match="several scenes would write"):
        next(run_scenes([scenes[0], str(twin)], OraclePredictor(), pool, out_dir=tmp_path, **OPTIONS))
    with pytest.raises(UserError, match="would both be written"):
        next(run_scenes([scenes[0], str(twin)], OraclePredictor(), pool, output=tmp_path / "x.gpkg", **OPTIONS))
    assert not list(tmp_path.glob("*.gpkg"))
    assert np.all([not p.name.startswith(".") for p in tmp_path.iterdir()])
