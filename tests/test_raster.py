"""The decimated whole-scene read behind the percentile statistics and the quicklook."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.raster import open_scene, read_overview


@pytest.mark.parametrize("height,width,max_side", [(1000, 1300, 300), (777, 500, 100), (2000, 300, 1024)])
def test_overview_read_row_by_row_equals_one_decimated_read(tmp_path, height, width, max_side):
    # Read a row of blocks at a time (bounded cache), it must sample exactly the pixels one read would.
    path = tmp_path / "scene.tif"
    image = np.random.default_rng(height).integers(0, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), tiled=True,
                       blockxsize=64, blockysize=64) as dst:
        dst.write(image)
    raw, valid, transform = read_overview(str(path), open_scene(str(path)), [3, 1, 1], max_side)
    with rasterio.open(path) as src:
        expected = src.read([3, 1, 1], out_shape=(3, *raw.shape[1:]))
    assert max(raw.shape[1:]) == min(max_side, max(height, width)) and valid.all()
    assert np.array_equal(raw, expected)
    assert transform * (raw.shape[2], raw.shape[1]) == pytest.approx(src.transform * (width, height))
