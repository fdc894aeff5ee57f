"""The quicklook page (issue 19.6): overview with outlines pixel for pixel, scene name, object count, legend with
counts, a scale bar in ground metres, and a bounded cost whatever the scene size."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from affine import Affine
from pyproj import Transformer
from scipy import ndimage

from pipeline.quicklook import (HEADER_PX, LEGEND_ROWS, MARGIN_PX, PANEL_PX, Quicklook, ground_metres_per_pixel,
                                legend_rows, scale_bar)
from pipeline.raster import compute_scaling, open_scene
from pipeline.settings import load_settings
from pipeline.style import PALETTE
from tests.oracle import paint_objects, write_scene

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # reading PNGs
UTM = ("EPSG:32616", Affine(0.5, 0, 500000, 0, -0.5, 4000000))


def scene_polygons(ids: np.ndarray, classes: np.ndarray, transform: Affine) -> tuple[list, list[int]]:
    geoms, labels = [], []
    for object_id in np.unique(ids[ids > 0]):
        mask = ids == object_id
        parts = [shapely.geometry.shape(g) for g, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                                                transform=transform)]
        geoms.append(shapely.union_all(parts))
        labels.append(int(classes[mask][0]))
    return geoms, labels


def test_the_page_has_the_canvas_pixel_for_pixel_a_legend_and_a_scale_bar(tmp_path):
    ids, classes = paint_objects(260, 300, 128, 32)
    scene = tmp_path / "north field.tif"
    write_scene(scene, ids, classes, *UTM)
    info = open_scene(str(scene))
    scaling = compute_scaling(str(scene), info, load_settings(None, {"scaling": "divide255"}), [1, 2, 3])
    look = Quicklook(str(scene), info, [1, 2, 3], scaling, class_names=["building", "tree", "car"])
    geoms, labels = scene_polygons(ids, classes, UTM[1])
    look.draw(shapely.to_wkb(geoms[:3]), labels[:3])  # two batches, as the writer sends them
    look.draw(shapely.to_wkb(geoms[3:]), labels[3:])

    caption = look.caption()
    per_class = {c: labels.count(c) for c in (1, 2)}
    assert caption.title == "north field.tif"
    assert caption.subtitle.startswith(f"{len(geoms)} objects") and "EPSG:32616" in caption.subtitle
    assert "0.5 m/px" in caption.subtitle
    assert caption.legend == [("building", (255, 40, 40), per_class[1]), ("tree", (40, 220, 255), per_class[2]),
                              ("car", (255, 220, 0), 0)]
    assert caption.scale is not None and caption.scale[1] == "20 m" and caption.scale[0] == pytest.approx(40, rel=1e-3)

    out = tmp_path / "out.quicklook.png"
    look.save(out)
    with rasterio.open(out) as png:
        page = png.read()
    assert page.shape[1:] == (HEADER_PX + 260 + MARGIN_PX, MARGIN_PX + 300 + PANEL_PX)
    canvas = look.canvas()
    map_part = page[:3, HEADER_PX:HEADER_PX + 260, MARGIN_PX:MARGIN_PX + 300]
    bar = np.zeros((260, 300), dtype=bool)
    bar[-60:, :80] = True  # the scale bar's box, bottom left
    assert np.array_equal(map_part[:, ~bar], canvas[:, ~bar])
    for class_id in (1, 2):  # outlines in the class colour on the canvas, and a swatch in the legend
        colour = PALETTE[class_id - 1][:, None, None]
        drawn = np.all(canvas == colour, axis=0)
        near = ndimage.binary_dilation(classes == class_id, np.ones((3, 3), dtype=bool))
        assert drawn.sum() > 50 and (drawn & near).sum() >= 0.95 * drawn.sum()
        assert np.all(page[:3, HEADER_PX:, MARGIN_PX + 300:] == colour, axis=0).sum() > 20
    assert (page[:3, :HEADER_PX] < 100).all(axis=0).sum() > 200  # the title's black text
    frame = page[:3, HEADER_PX - 1:HEADER_PX + 261, MARGIN_PX - 1:MARGIN_PX + 301]
    assert (frame[:, [0, -1], 1:-1] == 136).all() and (frame[:, 1:-1, [0, -1]] == 136).all()  # a grey frame
    assert (map_part[:, bar] < 60).all(axis=0).sum() > 100  # the bar's black half and its label


def test_the_scale_bar_is_in_ground_metres_in_utm_degrees_and_web_mercator():
    # UTM near its central meridian: grid metres are ground metres to 0.04 %.
    assert ground_metres_per_pixel(Affine(0.5, 0, 500000, 0, -0.5, 4000000), "EPSG:32616", 800, 600) \
        == pytest.approx(0.5, rel=5e-4)
    # Degrees at 60 N: 1e-5 degree of longitude on WGS 84 is a cos(lat) / sqrt(1 - e^2 sin^2(lat)) x pi/180 x 1e-5.
    a, e2, lat = 6378137.0, 0.00669437999014, np.radians(60)
    east = a * np.cos(lat) / np.sqrt(1 - e2 * np.sin(lat) ** 2) * np.pi / 180 * 1e-5
    assert ground_metres_per_pixel(Affine(1e-5, 0, 10, 0, -1e-5, 60.001), "EPSG:4326", 800, 200) \
        == pytest.approx(east, rel=1e-4)
    # Web Mercator's 'metres' are a / (a cos(lat) / sqrt(1 - e^2 sin^2 lat)) too long at latitude lat.
    x, y = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(10, 60)
    assert ground_metres_per_pixel(Affine(1, 0, x, 0, -1, y + 100), "EPSG:3857", 800, 200) \
        == pytest.approx(east * 1e5 * 180 / np.pi / a, rel=1e-4)
    assert scale_bar(0.5, 1000) == (200.0, "100 m")
    assert scale_bar(3.0, 1000) == (pytest.approx(500 / 3), "500 m")
    assert scale_bar(30.0, 1000) == (pytest.approx(5000 / 30), "5 km")
    assert scale_bar(0.01, 400) == (pytest.approx(50), "0.5 m")


def test_a_long_legend_sums_the_rarest_classes():
    counts = {i: 100 - i for i in range(1, 21)}
    rows = legend_rows(counts, None)
    assert len(rows) == LEGEND_ROWS and rows[0] == ("class_1", (255, 40, 40), 99)
    assert rows[-1] == ("7 more classes", None, sum(100 - i for i in range(14, 21)))


def test_a_large_scene_costs_a_canvas_of_at_most_1024_px(tmp_path):
    scene = tmp_path / "large.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=4000, height=2500, count=3, dtype="uint8", crs=UTM[0],
                       transform=UTM[1], tiled=True, blockxsize=512, blockysize=512, compress="deflate") as dst:
        dst.write(np.full((3, 2500, 4000), 90, dtype=np.uint8))
    info = open_scene(str(scene))
    look = Quicklook(str(scene), info, [1, 2, 3], compute_scaling(str(scene), info, load_settings(), [1, 2, 3]))
    look.draw([shapely.box(500000 + 100, 4000000 - 300, 500000 + 400, 4000000 - 100).wkb], [1])
    look.save(tmp_path / "large.png")
    with rasterio.open(tmp_path / "large.png") as png:
        assert (png.height, png.width) == (HEADER_PX + 640 + MARGIN_PX, MARGIN_PX + 1024 + PANEL_PX)
    assert look.caption().scale == (pytest.approx(102.4, rel=1e-3), "200 m")  # 2000 m of ground in 1024 px
