"""The run pipeline end to end with an oracle predictor on Ray (in-process local cluster)."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio.features
import rasterio.transform
from affine import Affine
from pyproj import Geod
from shapely.geometry import box, shape
from shapely.ops import unary_union

from pipeline.run import run_scene
from tests.oracle import OraclePredictor, paint_objects, write_scene

TILE, OVERLAP = 128, 32
HEIGHT, WIDTH = 260, 300


def truth_polygons(ids: np.ndarray, transform: Affine) -> dict[int, object]:
    polys: dict[int, list] = {}
    for geom, value in rasterio.features.shapes(ids, mask=ids > 0, transform=transform):
        polys.setdefault(int(value), []).append(shape(geom))
    return {k: unary_union(v) for k, v in polys.items()}


CASES = {
    "utm": ("EPSG:32616", Affine(0.5, 0, 733600.0, 0, -0.5, 3725140.0)),
    "wgs84": ("EPSG:4326", Affine(5e-6, 0, -84.39, 0, -5e-6, 33.76)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_oracle_objects_come_out_once_and_exact(tmp_path, ray_session, case):
    crs, transform = CASES[case]
    ids, classes = paint_objects(HEIGHT, WIDTH, TILE, OVERLAP)
    scene = tmp_path / "scene.tif"
    write_scene(scene, ids, classes, crs, transform)
    out = tmp_path / "out.gpkg"
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
                        scaling="divide255", batch_size=3, progress=False)
    assert summary.complete and summary.raw_instances > summary.merged_instances  # seams were merged

    result = gpd.read_file(out)
    truth = truth_polygons(ids, transform)
    assert len(result) == len(truth)
    assert result.crs.to_string() == crs
    scene_box = box(*rasterio.transform.array_bounds(HEIGHT, WIDTH, transform))
    geod = Geod(ellps="WGS84")
    for object_id, geom in truth.items():
        ious = [geom.intersection(g).area / geom.union(g).area for g in result.geometry]
        best = int(np.argmax(ious))
        assert ious[best] >= 0.99, (object_id, ious[best])
        assert sum(iou > 0.01 for iou in ious) == 1  # one polygon per object, not fragments
        row = result.iloc[best]
        assert row["class_id"] == classes[ids == object_id][0]
        assert row["class_name"] == OraclePredictor.class_names[row["class_id"] - 1]
        true_m2 = abs(geod.geometry_area_perimeter(geom)[0]) if case == "wgs84" else geom.area
        assert row["area_m2"] == pytest.approx(true_m2, rel=0.01)
    assert all(scene_box.buffer(1e-9).contains(g) for g in result.geometry)


def test_output_polygon_burns_back_onto_the_mask(tmp_path, ray_session):
    crs, transform = CASES["utm"]
    ids, classes = paint_objects(HEIGHT, WIDTH, TILE, OVERLAP)
    scene = tmp_path / "scene.tif"
    write_scene(scene, ids, classes, crs, transform)
    out = tmp_path / "out.gpkg"
    run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP, scaling="divide255",
              progress=False)
    result = gpd.read_file(out)
    burned = rasterio.features.rasterize(
        [(g, i + 1) for i, g in enumerate(result.geometry)], out_shape=ids.shape, transform=transform
    )
    assert np.array_equal(burned > 0, ids > 0)


class GradientFreeOracle(OraclePredictor):
    """A predictor with no `inference_mode` of its own (like a bare nn.Module): the worker must supply it."""

    def __call__(self, images):
        import torch

        if not torch.is_inference_mode_enabled():
            raise RuntimeError("the predictor ran with autograd on")
        return super().__call__(images)


def test_any_predictor_runs_without_autograd(tmp_path, ray_session):
    ids, classes = paint_objects(HEIGHT, WIDTH, TILE, OVERLAP)
    scene = tmp_path / "scene.tif"
    write_scene(scene, ids, classes, *CASES["utm"])
    summary = run_scene(str(scene), tmp_path / "out.gpkg", predictor=GradientFreeOracle(), tile=TILE,
                        overlap=OVERLAP, scaling="divide255", progress=False)
    assert summary.complete and summary.merged_instances == len(np.unique(ids)) - 1


def test_quicklook_and_report_sit_beside_the_output(tmp_path, ray_session):
    import json

    from pipeline.quicklook import HEADER_PX, MARGIN_PX, PANEL_PX
    from pipeline.style import PALETTE

    ids, classes = paint_objects(HEIGHT, WIDTH, TILE, OVERLAP)
    scene = tmp_path / "scene.tif"
    write_scene(scene, ids, classes, *CASES["utm"])
    out = tmp_path / "out.gpkg"
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
                        scaling="divide255", progress=False)

    with rasterio.open(tmp_path / "out.quicklook.png") as png:
        page = png.read()
    picture = page[:3, HEADER_PX:HEADER_PX + HEIGHT, MARGIN_PX:MARGIN_PX + WIDTH]  # the map, left of the legend
    assert page.shape[2] == MARGIN_PX + WIDTH + PANEL_PX  # smaller than 1024 px: drawn at full size
    for class_id in (1, 2):  # each class's outline in its colour, on the boundary of its objects
        drawn = np.all(picture == PALETTE[class_id - 1][:, None, None], axis=0)
        objects = classes > 0
        assert drawn.sum() > 50 and (drawn & (classes == class_id) | ~objects).sum() >= 0.9 * drawn.sum()
    padded = np.pad(ids > 0, 2)
    near = np.any([padded[r:r + HEIGHT, c:c + WIDTH] for r in range(5) for c in range(5)], axis=0)
    near[-60:, :80] = True  # the scale bar
    assert np.array_equal(picture[0][~near], ids[~near])  # away from outlines: the image itself (band 1 = ids)

    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["summary"]["merged_instances"] == summary.merged_instances == len(gpd.read_file(out))
    assert report["complete"] is True and report["scene"] == str(scene.resolve())
    assert set(report["summary"]["seconds"]) >= {"plan", "tiles", "merge+write"}
