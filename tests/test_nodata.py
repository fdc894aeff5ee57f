"""Which pixels are image: NaN (issue 18.5), declared and undeclared no-data collars, JPEG-blurred collar edges
(issue 19.1), blank windows, and the --nodata flag."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import torch
from affine import Affine
from scipy import ndimage

from core.errors import UserError
from pipeline.rect import Rect
from pipeline.raster import (COLLAR_MIN_PX, band_nodata, compute_scaling, first_look, open_scene, read_window,
                             valid_pixels)
from pipeline.run import run_scene
from pipeline.settings import load_settings
from pipeline.windows import plan_windows

UTM = Affine(0.5, 0, 500000, 0, -0.5, 4000000)
SIZE, TILE, OVERLAP = 384, 128, 32
OBJECTS = [(40, 120), (120, 250), (250, 340), (60, 330), (180, 300), (200, 200)]  # (x, y) of 20 px dark squares


class Blobs:
    """A model that JPEG noise fools: every blob of dark pixels (any channel under 0.1, channel 0 under 0.3)
    is an object (class 1), and so is every blob of almost-white ones (class 2): that is what the blurred
    edge of a white collar looks like to it. Pixels that are not image reach it as 0."""

    class_names = ["object", "noise"]

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            pixels = image.numpy()
            found = []
            dark = (pixels.min(axis=0) < 0.1) | (pixels[0] < 0.3)
            for label, mask in ((1, dark), (2, (pixels[0] > 0.8) & (pixels[0] < 0.995))):
                blobs, n = ndimage.label(mask)
                found += [(label, blobs == k) for k in range(1, n + 1)]
            masks = torch.zeros(len(found), 1, *pixels.shape[1:])
            boxes = torch.zeros(len(found), 4)
            for k, (_, mask) in enumerate(found):
                masks[k, 0] = torch.from_numpy(mask.astype(np.float32))
                rows, cols = np.nonzero(mask)
                boxes[k] = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
            outputs.append({"boxes": boxes, "labels": torch.tensor([f[0] for f in found], dtype=torch.int64),
                            "scores": torch.full((len(found),), 0.9), "masks": masks})
        return outputs


def write_collar_scene(path, photometric: str = "YCBCR", collar_value: int = 255) -> np.ndarray:
    """An orthomosaic as drones deliver them: JPEG-compressed RGB, textured ground with dark objects, and
    the area outside the flight (upper right, a diagonal edge) filled with white, no nodata declared.
    Returns the true collar mask."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    collar = xx - yy > 32
    image = ndimage.uniform_filter(110 + rng.normal(0, 14, (3, SIZE, SIZE)), (1, 3, 3))
    for x, y in OBJECTS:
        image[:, y - 10:y + 10, x - 10:x + 10] = 40
    image[:, collar] = collar_value
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8", crs="EPSG:32616",
                       transform=UTM, tiled=True, blockxsize=128, blockysize=128, compress="jpeg",
                       photometric=photometric) as dst:
        dst.write(np.clip(image, 0, 255).astype(np.uint8))
    return collar


def object_pixels(gpkg, transform: Affine, shape: tuple[int, int], label: str | None = None) -> np.ndarray:
    frame = gpd.read_file(gpkg)
    if label is not None:
        frame = frame[frame["class_name"] == label]
    if len(frame) == 0:
        return np.zeros(shape, dtype=bool)
    return rasterio.features.rasterize(frame.geometry, out_shape=shape, transform=transform).astype(bool)


# --- NaN (issue 18.5) ---

def write_nan_scene(path) -> None:
    """float32, no nodata declared: values 100-200, a dark object, a NaN block in every band and a NaN strip
    in band 3 only."""
    data = np.random.default_rng(1).uniform(100, 200, (3, 160, 200)).astype(np.float32)
    data[:, 100:130, 20:50] = 5.0  # a real dark object
    data[:, 20:60, 70:120] = np.nan
    data[2, 90:140, 140:190] = np.nan
    with rasterio.open(path, "w", driver="GTiff", width=200, height=160, count=3, dtype="float32", crs="EPSG:32616",
                       transform=UTM) as dst:
        dst.write(data)


def test_a_pixel_nan_in_any_band_is_not_image(tmp_path):
    scene = tmp_path / "nan.tif"
    write_nan_scene(scene)
    _, valid = read_window(str(scene), Rect(0, 0, 256, 256), [1, 2, 3], None)
    nan = np.zeros((256, 256), dtype=bool)
    nan[20:60, 70:120] = nan[90:140, 140:190] = True
    inside = np.zeros((256, 256), dtype=bool)
    inside[:160, :200] = True
    assert np.array_equal(valid, inside & ~nan)


def test_nan_pixels_are_left_out_of_every_band_s_statistics(tmp_path):
    scene = tmp_path / "nan.tif"
    data = np.random.default_rng(2).uniform(100, 200, (2, 100, 100)).astype(np.float32)
    data[0, :, :30] = np.nan
    data[1, :, :30] = 60000.0  # only where band 1 is NaN: such pixels are not image
    with rasterio.open(scene, "w", driver="GTiff", width=100, height=100, count=2, dtype="float32",
                       crs="EPSG:32616", transform=UTM) as dst:
        dst.write(data)
    scaling = compute_scaling(str(scene), open_scene(str(scene)), load_settings(), [1, 2, 2])
    assert scaling.high[1] < 201 and scaling.low[1] > 99


# --- Collar rule on plain arrays ---

def test_jpeg_blurred_edge_of_a_solid_collar_is_nodata_and_lone_white_pixels_keep_their_neighbours():
    data = np.full((3, 60, 60), 120, dtype=np.uint8)
    data[:, :, 40:] = 255  # a solid collar (20 x 60 px)
    data[:, :, 37:40] = 235  # its blurred edge, within NODATA_NEAR
    data[:, 10:15, 45:50] = 180  # an enclosed speck (25 px) of JPEG ringing
    data[:, 40:45, 5:9] = 255  # a few real white pixels (20 px) ...
    data[:, 39:46, 4:10][data[:, 39:46, 4:10] != 255] = 240  # ... in a bright roof
    valid = valid_pixels(data, (255.0,) * 3)
    assert not valid[:, 37:].any()  # collar, its blurred edge and the enclosed speck
    assert valid[:, :37].sum() == 60 * 37 - 20  # only the exact white pixels of the roof go
    # 16-bit data are never lossy-compressed: only exact values are nodata.
    assert valid_pixels(data.astype(np.uint16), (255.0,) * 3)[:, 37:40].all()
    assert COLLAR_MIN_PX > 20


def test_a_real_scene_declaring_white_as_nodata_loses_only_its_exact_white_pixels():
    # NEON OSBS_029 declares nodata 255 and has 461 real pure-white pixels in specks of at most 8 px.
    path = "data/samples/neon_osbs/OSBS_029.tif"
    info = open_scene(path)
    _, valid = read_window(path, Rect(0, 0, 400, 400), [1, 2, 3], band_nodata(None, info, [1, 2, 3], path))
    with rasterio.open(path) as src:
        white = np.all(src.read() == 255, axis=0)
    assert white.sum() == 461 and np.array_equal(valid, ~white)


def test_validity_does_not_depend_on_the_window_that_reads_a_pixel(tmp_path):
    scene = tmp_path / "ortho.tif"
    write_collar_scene(scene)
    _, whole = read_window(str(scene), Rect(0, 0, SIZE, SIZE), [1, 2, 3], 255)
    for window in plan_windows(SIZE, SIZE, 96, 20):
        _, valid = read_window(str(scene), window, [1, 2, 3], 255)
        if valid.any():
            rows, cols = window.slices()
            assert np.array_equal(valid, whole[rows, cols])


# --- Blank windows, the collar warning, --nodata ---

def test_windows_of_one_colour_are_skipped_without_any_nodata(tmp_path):
    scene = tmp_path / "ortho.tif"
    collar = write_collar_scene(scene)
    blank = [w for w in plan_windows(SIZE, SIZE, TILE, OVERLAP) if collar[w.slices()].all()]
    assert len(blank) == 3
    for window in plan_windows(SIZE, SIZE, TILE, OVERLAP):
        raw, valid = read_window(str(scene), window, [1, 2, 3], None)
        assert valid.any() == (window not in blank)
    # One pixel of another colour is enough to be image.
    flat = tmp_path / "flat.tif"
    data = np.stack([np.full((100, 100), v, dtype=np.uint8) for v in (10, 20, 30)])
    for value in (30, 31):
        data[2, 50, 50] = value
        with rasterio.open(flat, "w", driver="GTiff", width=100, height=100, count=3, dtype="uint8",
                           crs="EPSG:32616", transform=UTM) as dst:
            dst.write(data)
        _, valid = read_window(str(flat), Rect(0, 0, 100, 100), [1, 2, 3], None)
        assert valid.all() == (value == 31) and valid.any() == (value == 31)


def test_an_undeclared_collar_gets_one_warning_naming_the_flag(tmp_path):
    scene = tmp_path / "ortho.tif"
    write_collar_scene(scene)
    info = open_scene(str(scene))
    overview, notes = first_look(str(scene), info, [1, 2, 3], None)
    assert len(notes) == 1 and "pass --nodata 255" in notes[0] and "41%" in notes[0]
    assert first_look(str(scene), info, [1, 2, 3], (255.0,) * 3)[1] == []  # declared: nothing to say
    black = tmp_path / "black.tif"
    write_collar_scene(black, collar_value=0)
    assert "pass --nodata 0" in first_look(str(black), open_scene(str(black)), [1, 2, 3], None)[1][0]
    # Real imagery without a collar says nothing (its declared nodata aside).
    for path in ("data/samples/neon_osbs/OSBS_029.tif", "data/samples/spacenet_atlanta/sample_geotiff.tif"):
        info = open_scene(path)
        bands = [1, 2, 3] if info.count == 3 else [1, 1, 1]
        assert first_look(path, info, bands, None)[1] == []


def test_nodata_one_value_or_one_per_band(tmp_path):
    scene = tmp_path / "ortho.tif"
    write_collar_scene(scene)
    info = open_scene(str(scene))
    assert band_nodata(None, info, [1, 2, 3], "s") is None
    assert band_nodata(255, info, [1, 1, 1], "s") == (255.0,) * 3
    assert band_nodata([1, 2, 3], info, [3, 1, 1], "s") == (3.0, 1.0, 1.0)
    with pytest.raises(UserError, match="nodata has 2 values but the scene has 3 bands"):
        band_nodata([0, 0], info, [1, 2, 3], "s")
    with pytest.raises(UserError, match="nodata must be a number"):
        load_settings(None, {"nodata": "white"})
    from pipeline.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "a.tif", "--nodata", "255"]).nodata == 255.0
    assert parser.parse_args(["prepare", "a.tif", "--labels", "l.gpkg", "--out", "o", "--nodata", "0,0,0"]).nodata \
        == [0.0, 0.0, 0.0]
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "a.tif", "--nodata", "white"])


# --- Whole runs (Ray) ---

def test_nan_pixels_never_yield_objects(tmp_path, ray_session):
    scene = tmp_path / "nan.tif"
    write_nan_scene(scene)
    out = tmp_path / "nan.gpkg"
    run_scene(str(scene), out, predictor=Blobs(), tile=64, overlap=16, scaling="range", value_range=[0, 255],
              progress=False)
    found = object_pixels(out, UTM, (160, 200))
    nan = np.zeros((160, 200), dtype=bool)
    nan[20:60, 70:120] = nan[90:140, 140:190] = True
    assert not (found & nan).any()
    assert found[100:130, 20:50].all()  # the real dark object


def test_a_declared_jpeg_collar_never_yields_objects(tmp_path, ray_session):
    scene = tmp_path / "ortho.tif"
    collar = write_collar_scene(scene)
    # The model does see objects in the collar's blurred edge: many of its pixels are almost white, not white.
    with rasterio.open(scene) as src:
        edge = collar & (src.read(1) > 204) & (src.read(1) < 254)
    assert edge.sum() > 300
    out = tmp_path / "ortho.gpkg"
    summary = run_scene(str(scene), out, predictor=Blobs(), tile=TILE, overlap=OVERLAP, nodata=255, progress=False)
    assert summary.tiles_nodata == 3 and not summary.warnings
    assert not (object_pixels(out, UTM, (SIZE, SIZE)) & collar).any()
    found = object_pixels(out, UTM, (SIZE, SIZE), "object")
    assert all(found[y - 10:y + 10, x - 10:x + 10].all() for x, y in OBJECTS)
    assert len(gpd.read_file(out).query("class_name == 'object'")) == len(OBJECTS)
