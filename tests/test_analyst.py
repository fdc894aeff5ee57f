"""What a GIS analyst meets first: an empty result explained, specks and tiny objects left out."""

from __future__ import annotations

import json

import geopandas as gpd
import numpy as np
import shapely
from affine import Affine

from pipeline.run import run_scene
from tests.oracle import OraclePredictor, write_scene

TILE, OVERLAP = 128, 32
UTM = ("EPSG:32616", Affine(0.5, 0, 733600.0, 0, -0.5, 3725140.0))  # 0.25 m^2 per pixel
OPTIONS = {"tile": TILE, "overlap": OVERLAP, "scaling": "divide255", "progress": False}


class Unsure(OraclePredictor):
    """The oracle with every score at 0.2: a weak model."""

    def __call__(self, images):
        outputs = super().__call__(images)
        for out in outputs:
            out["scores"] = out["scores"] * 0 + 0.2
        return outputs


def scene_with(tmp_path, shapes: list[np.ndarray]):
    ids = np.zeros((200, 220), dtype=np.uint8)
    for k, mask in enumerate(shapes):
        ids[mask] = k + 1
    path = tmp_path / "scene.tif"
    write_scene(path, ids, (ids > 0).astype(np.uint8), *UTM)
    return path


def box_mask(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    mask = np.zeros((200, 220), dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def test_an_empty_result_says_why_with_the_highest_score_seen(tmp_path, ray_session):
    scene = scene_with(tmp_path, [box_mask(20, 40, 20, 40), box_mask(60, 80, 30, 50)])
    out = tmp_path / "out.gpkg"
    summary = run_scene(str(scene), out, predictor=Unsure(), **OPTIONS)
    assert summary.merged_instances == 0 and len(gpd.read_file(out)) == 0
    (warning,) = [w for w in summary.warnings if w.startswith("no object kept")]
    assert "score threshold 0.5" in warning and "highest score seen 0.200" in warning
    assert "no object kept" in "\n".join(summary.lines())
    report = json.loads((tmp_path / "out.report.json").read_text())["summary"]
    assert abs(report["best_dropped_score"] - 0.2) < 1e-6 and report["dropped_scores"][2] >= 2  # the 0.2-0.3 bin


def test_specks_and_tiny_objects_are_left_out(tmp_path, ray_session):
    house = box_mask(20, 40, 20, 40)
    house[45, 45] = True  # a one-pixel speck of the same object, diagonal to nothing: a second part
    shed = box_mask(100, 104, 100, 104)  # 16 px = 4 m^2
    scene = scene_with(tmp_path, [house, shed])
    out = tmp_path / "default.gpkg"
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), **OPTIONS)
    frame = gpd.read_file(out).sort_values("area_m2")
    assert len(frame) == 2 and [len(g.geoms) for g in frame.geometry] == [1, 1]  # the speck is gone
    assert np.allclose(frame["area_m2"], [4.0, 100.0], rtol=0.003)  # true areas: UTM's scale factor here
    kept = tmp_path / "kept.gpkg"
    run_scene(str(scene), kept, predictor=OraclePredictor(), min_part_px=0, **OPTIONS)
    parts = sorted(len(g.geoms) for g in gpd.read_file(kept).geometry)
    assert parts == [1, 2]
    small = tmp_path / "no_sheds.gpkg"
    summary = run_scene(str(scene), small, predictor=OraclePredictor(), min_area=5.0, **OPTIONS)
    frame = gpd.read_file(small)
    assert len(frame) == 1 and frame["area_m2"].iloc[0] > 5 and summary.left_out == 1
    assert "1 under --min-area left out" in "\n".join(summary.lines())


def test_prepare_leaves_the_same_specks_out_of_its_labels():
    from rasterio.transform import from_origin

    from pipeline.training_data.coco import annotation_body

    transform = from_origin(0, 64, 1, 1)
    house = shapely.box(10, 30, 30, 50)
    speck = shapely.box(40.2, 20.2, 40.8, 20.8)  # covers one pixel centre
    body = annotation_body(shapely.MultiPolygon([house, speck]), transform, 64, 64, min_area_px=0, min_part_px=4)
    assert body["area"] == 400
    body = annotation_body(shapely.MultiPolygon([house, speck]), transform, 64, 64, min_area_px=0, min_part_px=0)
    assert body["area"] == 401
