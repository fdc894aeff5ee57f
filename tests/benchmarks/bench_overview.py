"""Driver memory of the decimated whole-scene read (statistics, collar check, quicklook) against the scene's
width (issue 18.7): peak RSS growth of a fresh process around `read_overview`, on sparse 3-band uint16
GeoTIFFs (blocks never written read as zero: the files are tiny, GDAL still decodes and caches every block).

    python -m tests.benchmarks.bench_overview [--widths 25000 100000 200000] [--code DIR]

`--code DIR`: measure the pipeline of another checkout (e.g. the commit before a change).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from tests.benchmarks.common import machine

LAYOUTS = {"tiled 512": dict(tiled=True, blockxsize=512, blockysize=512), "striped 16 rows": dict(blockysize=16)}


def make_scene(path: Path, width: int, height: int, layout: dict) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint16",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), compress="deflate",
                       sparse_ok=True, **layout) as dst:
        dst.write(np.full((3, 16, 512), 1000, dtype=np.uint16), window=((0, 16), (0, 512)))
    return path


def measure(scene: Path, code: Path) -> tuple[float, float]:
    """(peak RSS growth in MiB, seconds) of read_overview in a process of its own."""
    script = textwrap.dedent(f"""
        import time
        from pipeline.raster import open_scene, read_overview
        def peak():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
        info = open_scene({str(scene)!r})
        before, t = peak(), time.perf_counter()
        read_overview(info.path, info, [1, 2, 3])
        print(peak() - before, time.perf_counter() - t)
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=code, capture_output=True, text=True, check=True)
    growth, seconds = out.stdout.split()
    return float(growth), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", type=int, nargs="+", default=[25_000, 100_000, 200_000])
    parser.add_argument("--height", type=int, default=2048)
    parser.add_argument("--workdir", default="/tmp/aerial-bench")
    parser.add_argument("--code", default=str(Path(__file__).resolve().parents[2]))
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; code: {args.code}")
    for name, layout in LAYOUTS.items():
        for width in args.widths:
            scene = make_scene(work / f"wide_{width}_{name.replace(' ', '_')}.tif", width, args.height, layout)
            growth, seconds = measure(scene, Path(args.code))
            print(f"{width} x {args.height} px, 3 x uint16, {name}: driver peak RSS +{growth:.0f} MiB, "
                  f"{seconds:.2f} s")


if __name__ == "__main__":
    main()
