"""The decimated whole-scene read behind the percentile statistics, the collar check and the quicklook."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.raster import open_scene, read_overview

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("height,width,max_side,chunk_bytes", [
    (1000, 1300, 300, 16 * 2**20), (777, 500, 100, 16 * 2**20), (2000, 300, 1024, 16 * 2**20),
    (1000, 1300, 300, 3 * 64 * 64 * 3), (777, 2500, 1024, 2 * 64 * 64 * 3),  # 3 and 2 blocks a read
])
def test_overview_read_in_pieces_equals_one_decimated_read(tmp_path, height, width, max_side, chunk_bytes):
    # Read by rows and columns of blocks (bounded cache), it must sample exactly the pixels one read would.
    path = tmp_path / "scene.tif"
    image = np.random.default_rng(height).integers(0, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), tiled=True,
                       blockxsize=64, blockysize=64) as dst:
        dst.write(image)
    overview = read_overview(str(path), open_scene(str(path)), [3, 1, 1], max_side, chunk_bytes=chunk_bytes)
    raw, valid, transform = overview.data, overview.valid, overview.transform
    with rasterio.open(path) as src:
        expected = src.read([3, 1, 1], out_shape=(3, *raw.shape[1:]))
    assert max(raw.shape[1:]) == min(max_side, max(height, width)) and valid.all()
    assert np.array_equal(raw, expected)
    assert transform * (raw.shape[2], raw.shape[1]) == pytest.approx(src.transform * (width, height))


def peak_growth_mb(scene: Path) -> float:
    """Peak RSS growth (MB) of a fresh Python process during read_overview of `scene`: GDAL's block cache is
    process-wide, so only a process of its own measures it."""
    script = textwrap.dedent(f"""
        from pipeline.raster import open_scene, read_overview
        def peak():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
        info = open_scene({str(scene)!r})
        before = peak()
        read_overview(info.path, info, [1, 2, 3])
        print(peak() - before)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def test_overview_memory_does_not_grow_with_the_scene_width(tmp_path):
    # Issue 18.7: the read set GDAL's cache to ~4 rows of blocks; one row of 256 px blocks of this 200 000 px
    # wide 3-band uint16 scene is 300 MB. Sparse (blocks never written read as zero), so the file is tiny.
    scene = tmp_path / "wide.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=200_000, height=256, count=3, dtype="uint16",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", sparse_ok=True) as dst:
        dst.write(np.full((3, 256, 256), 1000, dtype=np.uint16), window=((0, 256), (0, 256)))
    assert peak_growth_mb(scene) < 100  # measured: 34 MB (295 MB before)
