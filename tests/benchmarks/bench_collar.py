"""How well the no-data collar rule (pipeline/raster.py) takes a JPEG-blurred collar edge, on real imagery: the
NEON sample (400 x 400 px RGB) with its upper-right part filled white or black along a diagonal, as orthomosaics
fill the area outside the flight, JPEG-compressed at several qualities, read with --nodata declared.

    python -m tests.benchmarks.bench_collar

Per case: collar pixels JPEG left off the fill value, those the rule leaves as image (and how many of them
touch the image), and image pixels not exactly the fill value it takes for collar (bright or dark ground
along the edge; pixels exactly the fill value are nodata by declaration).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window
from scipy import ndimage

from pipeline.raster import read_window
from tests.benchmarks.common import machine

SAMPLE = Path(__file__).resolve().parents[2] / "data/samples/neon_osbs/OSBS_029.tif"
CASES = [("YCBCR", 75), ("RGB", 75), ("YCBCR", 50), ("YCBCR", 90)]


def main() -> None:
    print(f"machine: {machine()}")
    with rasterio.open(SAMPLE) as src:
        image, profile = src.read(), src.profile
    height, width = image.shape[1:]
    yy, xx = np.mgrid[0:height, 0:width]
    collar = xx - yy > 100
    edge_of_image = ndimage.binary_dilation(~collar, np.ones((3, 3), dtype=bool)) & collar
    with tempfile.TemporaryDirectory() as work:
        for fill in (255, 0):
            for photometric, quality in CASES:
                data = image.copy()
                data[:, collar] = fill
                path = Path(work) / "ortho.tif"
                profile.update(driver="GTiff", nodata=None, tiled=True, blockxsize=256, blockysize=256,
                               compress="jpeg", photometric=photometric, jpeg_quality=quality)
                with rasterio.open(path, "w", **profile) as dst:
                    dst.write(data)
                with rasterio.open(path) as src:
                    off = np.any(src.read() != fill, axis=0)
                noisy = collar & off
                _, valid = read_window(str(path), Window(0, 0, width, height), [1, 2, 3], fill)
                left = collar & valid
                print(f"fill {fill:3d}, JPEG {photometric} q{quality}: {collar.sum()} collar px, {noisy.sum()} "
                      f"off {fill}; left as image {left.sum()} ({(left & edge_of_image).sum()} touching the image); "
                      f"image px not exactly {fill} taken for collar {(~collar & ~valid & off).sum()}")


if __name__ == "__main__":
    main()
