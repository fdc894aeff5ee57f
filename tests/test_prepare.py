"""prepare: vectors -> COCO tiles, exact to the pixel, with a leak-free spatial split."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from pycocotools import mask as mask_utils
from rasterio.windows import Window
from shapely.geometry import MultiPolygon, Polygon, box

from core.errors import UserError
from pipeline.training_data.coco import annotation_body, burn
from pipeline.training_data.prepare import prepare
from pipeline.settings import load_settings
from pipeline.training_data.split import spatial_split
from pipeline.windows import plan_windows

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
UTM = "EPSG:32616"
TRANSFORM = Affine(0.5, 0, 733600.0, 0, -0.5, 3725140.0)


def decode(segmentation, h, w) -> np.ndarray:
    if isinstance(segmentation, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w)))
    return mask_utils.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()})


def to_map(coords, transform=TRANSFORM):
    return [transform @ (x, y) for x, y in coords]


def test_coco_annotation_burns_back_to_the_same_pixels():
    rng = np.random.default_rng(0)
    window = Window(40, 30, 96, 80)
    wt = rasterio.windows.transform(window, TRANSFORM)
    for _ in range(30):
        # An awkward polygon in scene pixels (non-integer vertices), partly outside the window.
        cx, cy = rng.uniform(30, 150, 2)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
        radii = rng.uniform(5, 30, 7)
        coords = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, radii)]
        poly = Polygon(to_map(coords))
        if not poly.is_valid:
            continue
        body = annotation_body(poly, wt, 80, 96, min_area_px=0)
        expected = burn(poly, wt, 80, 96)
        if body is None:
            assert expected.sum() == 0
            continue
        assert np.array_equal(decode(body["segmentation"], 80, 96), expected)
        assert body["area"] == int(expected.sum())
        x, y, w, h = body["bbox"]
        rows, cols = np.nonzero(expected)
        assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def test_holes_become_rle_and_multiparts_keep_every_part():
    window = Window(0, 0, 64, 64)
    wt = rasterio.windows.transform(window, TRANSFORM)
    courtyard = Polygon(to_map([(5, 5), (40, 5), (40, 40), (5, 40)]), [to_map([(15, 15), (30, 15), (30, 30), (15, 30)])])
    body = annotation_body(courtyard, wt, 64, 64, 0)
    assert isinstance(body["segmentation"], dict)  # RLE
    mask = decode(body["segmentation"], 64, 64)
    assert mask[20, 20] == 0 and mask[8, 8] == 1
    two = MultiPolygon([Polygon(to_map([(2, 2), (10, 2), (10, 10), (2, 10)])),
                        Polygon(to_map([(30, 30), (50, 30), (50, 40), (30, 40)]))])
    body = annotation_body(two, wt, 64, 64, 0)
    assert isinstance(body["segmentation"], list) and len(body["segmentation"]) == 2
    assert body["area"] == 8 * 8 + 20 * 10


def test_spatial_split_never_lets_overlapping_tiles_straddle():
    rng = np.random.default_rng(1)
    for _ in range(20):
        tile = int(rng.choice([64, 128]))
        overlap = int(rng.integers(0, tile // 2))
        width, height = (int(v) for v in rng.integers(tile, tile * 8, 2))
        windows = plan_windows(width, height, tile, overlap)
        sides = spatial_split(windows, 2 * (tile - overlap), 0.3, int(rng.integers(0, 100)))
        val = [w for w, s in zip(windows, sides) if s == "val"]
        train = [w for w, s in zip(windows, sides) if s == "train"]
        blocks = {(w.row0 // (2 * (tile - overlap)), w.col0 // (2 * (tile - overlap))) for w in windows}
        if len(blocks) >= 2:
            assert val
        for t in train:
            for v in val:
                assert not _overlaps(t, v)


def _overlaps(a, b) -> bool:
    return not a.intersection(b).empty


def write_scene(path: Path, width=200, height=160, nodata_rows: slice | None = None) -> None:
    # A faint texture: a window of one flat colour holds nothing to find and would be skipped as no-data.
    data = np.broadcast_to(100 + np.indices((height, width)).sum(axis=0) % 7, (3, height, width)).astype(np.uint8)
    if nodata_rows is not None:
        data[:, nodata_rows] = 0
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=UTM,
                       transform=TRANSFORM, nodata=0) as dst:
        dst.write(data)


def settings(**prepare_options):
    return load_settings(overrides={"tile": 64, "overlap": 16, "scaling": "divide255",
                                    "prepare": {"class_field": "kind", "min_area_px": 0, "empty_fraction": 1.0,
                                                "val_fraction": 0.0, **prepare_options}})


def test_labels_in_wgs84_over_a_utm_scene_land_on_the_right_pixels(tmp_path):
    scene = tmp_path / "scene.tif"
    write_scene(scene)
    square_px = [(40.3, 20.6), (90.2, 20.6), (90.2, 45.1), (40.3, 45.1)]
    poly_utm = Polygon(to_map(square_px))
    labels = gpd.GeoDataFrame({"kind": ["house"]}, geometry=[poly_utm], crs=UTM).to_crs("EPSG:4326")
    labels.to_file(tmp_path / "labels.geojson")
    prepare([str(scene)], str(tmp_path / "labels.geojson"), tmp_path / "out", settings(), progress=False)
    coco = json.loads((tmp_path / "out" / "train" / "annotations.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "house"}]
    seen = 0
    for ann in coco["annotations"]:
        image = next(im for im in coco["images"] if im["id"] == ann["image_id"])
        col, row, w, h = image["window"]
        wt = Affine(*image["transform"])
        assert wt == rasterio.windows.transform(Window(col, row, w, h), TRANSFORM)
        expected = burn(poly_utm, wt, h, w)
        got = decode(ann["segmentation"], h, w)
        # Reprojection round trip moves vertices by nanometres: allow pixels whose centre sits on the edge.
        assert np.abs(got.astype(int) - expected).sum() <= 2
        seen += 1
    assert seen >= 2  # the square straddles a seam: it appears in more than one tile


def test_all_nodata_tiles_are_skipped(tmp_path):
    scene = tmp_path / "scene.tif"
    write_scene(scene, nodata_rows=slice(0, 80))
    labels = gpd.GeoDataFrame({"kind": ["a"]}, geometry=[Polygon(to_map([(10, 120), (30, 120), (30, 140)]))], crs=UTM)
    labels.to_file(tmp_path / "labels.gpkg")
    summary = prepare([str(scene)], str(tmp_path / "labels.gpkg"), tmp_path / "out", settings(), progress=False)
    assert summary["skipped_nodata_tiles"] > 0
    coco = json.loads((tmp_path / "out" / "train" / "annotations.json").read_text())
    assert all(im["window"][1] + 64 > 80 for im in coco["images"])


def test_bad_labels_fail_with_one_clear_line(tmp_path):
    scene = tmp_path / "scene.tif"
    write_scene(scene)
    good = gpd.GeoDataFrame({"kind": ["a"], "name": ["x"]}, geometry=[box(*to_map([(10, 10)])[0], *to_map([(20, 5)])[0])], crs=UTM)
    good.to_file(tmp_path / "good.gpkg")
    with pytest.raises(UserError, match="no field 'klass' .fields: kind, name"):
        prepare([str(scene)], str(tmp_path / "good.gpkg"), tmp_path / "o1", settings(class_field="klass"), progress=False)
    far = good.copy()
    far.geometry = [box(0, 0, 10, 10)]
    far.to_file(tmp_path / "far.gpkg")
    with pytest.raises(UserError, match="no label intersects"):
        prepare([str(scene)], str(tmp_path / "far.gpkg"), tmp_path / "o2", settings(), progress=False)
    (tmp_path / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(UserError, match="empty.geojson"):
        prepare([str(scene)], str(tmp_path / "empty.geojson"), tmp_path / "o3", settings(), progress=False)
    nocrs = good.set_crs(None, allow_override=True)
    nocrs.to_file(tmp_path / "nocrs.gpkg")
    with pytest.raises(UserError, match="no CRS"):
        prepare([str(scene)], str(tmp_path / "nocrs.gpkg"), tmp_path / "o4", settings(), progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_invalid_geometries_are_repaired_and_counted(tmp_path):
    scene = tmp_path / "scene.tif"
    write_scene(scene)
    bowtie = Polygon(to_map([(10, 10), (40, 40), (40, 10), (10, 40)]))
    assert not bowtie.is_valid
    gpd.GeoDataFrame({"kind": ["a"]}, geometry=[bowtie], crs=UTM).to_file(tmp_path / "bad.gpkg")
    summary = prepare([str(scene)], str(tmp_path / "bad.gpkg"), tmp_path / "out", settings(), progress=False)
    assert summary["labels_read"]["repaired"] == 1 and summary["objects"]["train"] == {"a": 1}


@pytest.mark.skipif(not (SAMPLES / "spacenet_atlanta").exists(), reason="sample data not present")
def test_real_sample_prepares_sanely(tmp_path):
    scene = SAMPLES / "spacenet_atlanta" / "sample_geotiff.tif"
    labels = SAMPLES / "spacenet_atlanta" / "geotiff_labels.geojson"
    s = load_settings(overrides={"tile": 256, "overlap": 32, "prepare": {"class_name": "building"}})
    summary = prepare([str(scene)], str(labels), tmp_path / "out", s, progress=False)
    total = sum(summary["objects"]["train"].values()) + sum(summary["objects"]["val"].values())
    assert summary["tiles"]["train"] > 0 and summary["tiles"]["val"] > 0
    assert 30 <= total <= 120  # 43 buildings; ones cut by tile edges appear in several tiles, some tiles dropped
    with rasterio.open(tmp_path / "out" / "train" / "images" / json.loads(
            (tmp_path / "out" / "train" / "annotations.json").read_text())["images"][0]["file_name"]) as src:
        image = src.read()
    assert image.shape == (3, 256, 256) and image.std() > 10  # stretched uint16, not a flat image


def test_interrupted_prepare_leaves_nothing_half_written_and_reruns(tmp_path, monkeypatch):
    import pipeline.training_data.prepare as prepare_module

    scene = tmp_path / "scene.tif"
    write_scene(scene)
    gpd.GeoDataFrame({"kind": ["a"]}, geometry=[Polygon(to_map([(10, 10), (40, 10), (40, 40)]))],
                     crs=UTM).to_file(tmp_path / "labels.gpkg")
    real_write = prepare_module.write_png
    written = []

    def write_then_interrupt(path, image):
        real_write(path, image)
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_png", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(scene)], str(tmp_path / "labels.gpkg"), tmp_path / "out", settings(), progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(prepare_module, "write_png", real_write)
    summary = prepare([str(scene)], str(tmp_path / "labels.gpkg"), tmp_path / "out", settings(), progress=False)
    images = sorted(p.name for p in (tmp_path / "out" / "train" / "images").iterdir())
    coco = json.loads((tmp_path / "out" / "train" / "annotations.json").read_text())
    assert images == sorted(im["file_name"] for im in coco["images"]) and len(images) == summary["tiles"]["train"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.gpkg", "out", "scene.tif"]
