"""Output formats: seconds, file sizes and the writer's memory for the same rows written in every format.

Rows are round objects of 6-16 px traced along their pixel edges by the run's polygonizer (a third with a
hole), at 0.5 m in UTM, written through the writer interface the run uses, in its batches of
`scene_run.WRITE_BATCH` rows, and read back whole with geopandas. The writer's memory is the peak RSS of a
fresh process while it writes, over its RSS before: with N and 4 N rows it shows whether memory grows with
the number of objects.

    python tests/benchmarks/bench_writers.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: import this checkout's packages, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import json
import os
import pickle
import subprocess
import tempfile

import geopandas as gpd
import numpy as np
import shapely
from affine import Affine

from pipeline.features import AreaMeter, Rows
from pipeline.polygonize import masks_to_geometries
from pipeline.scene_run import WRITE_BATCH
from pipeline.writers import WRITERS, writer_for
from tests.benchmarks.common import PeakMemory, publish

CRS = "EPSG:32616"
X0, Y0 = 733_600.0, 3_725_140.0
DISTINCT_BATCHES = 20  # 100 000 distinct objects; more rows repeat them (the writers do not care)


def disk(rng: np.random.Generator) -> np.ndarray:
    """A round object of 6-16 px radius; a third have a hole."""
    radius = rng.uniform(6, 16)
    yy, xx = np.mgrid[-16:17, -16:17]
    d = np.hypot(yy, xx)
    return (d <= radius) & ((d >= 3) if rng.random() < 0.33 else True)


def batches(seed: int = 0) -> list[tuple[Rows, list[str]]]:
    """DISTINCT_BATCHES batches of objects traced by the run's own polygonizer on a 40 000 px square scene."""
    rng = np.random.default_rng(seed)
    meter = AreaMeter(CRS, (X0, Y0))
    transform = Affine(0.5, 0, X0, 0, -0.5, Y0)
    made = []
    for b in range(DISTINCT_BATCHES):
        corners = rng.integers(0, 40_000, (WRITE_BATCH, 2)).tolist()
        geoms = masks_to_geometries([(disk(rng), r, c) for r, c in corners], transform)
        classes = rng.integers(1, 3, WRITE_BATCH)
        rows = Rows.of([(b, k) for k in range(WRITE_BATCH)], geoms, classes.tolist(),
                       rng.uniform(0.5, 1.0, WRITE_BATCH).tolist(), meter)
        made.append((rows, ["building" if c == 1 else "tree" for c in classes.tolist()]))
    return made


def write(path: Path, made: list[tuple[Rows, list[str]]], rows: int) -> tuple[float, int]:
    """Seconds to write `rows` rows to `path` (open to renamed into place), and the writer's peak memory."""
    writer_class = writer_for(path)  # its modules imported before the baseline
    before = PeakMemory.sample()[0]
    with PeakMemory(interval=0.02) as peak:
        t = time.perf_counter()
        with writer_class(path, CRS, layer="objects", class_names=["building", "tree"]) as writer:
            for i in range(rows // WRITE_BATCH):
                writer.write(*made[i % len(made)])
            writer.set_metadata({"benchmark": True})
        seconds = time.perf_counter() - t
    return seconds, max(0, peak.peak - before)


def measure(batches_file: Path, path: Path, rows: int) -> dict[str, float]:
    """One format and size, in a fresh process (`--child`): memory freed by an earlier write would hide growth."""
    made = pickle.loads(batches_file.read_bytes())
    seconds, memory = write(path, made, rows)
    parts = [p for p in writer_for(path).files(path) if p.exists()]
    size = sum(p.stat().st_size for p in parts if p.suffix != ".qml")
    t = time.perf_counter()
    frame = gpd.read_parquet(path) if path.suffix == ".parquet" else gpd.read_file(path, layer="objects"
                                                                                   if path.suffix == ".gpkg" else None)
    assert len(frame) == rows, (path, len(frame))
    read_seconds = time.perf_counter() - t
    for part in parts:
        part.unlink()
    return {"seconds": seconds, "memory": memory, "size": size, "read": read_seconds}


def in_child(batches_file: Path, path: Path, rows: int) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_writers", "--child", str(batches_file),
                           str(path), str(rows)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--child", nargs=3, metavar=("BATCHES", "OUTPUT", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]), int(args.child[2]))))
        return
    load = os.getloadavg()[0]
    made = batches()
    vertices = np.mean([shapely.get_num_coordinates(shapely.from_wkb(r.wkb)).mean() for r, _ in made])
    wkb = np.mean([np.mean([len(w) for w in r.wkb]) for r, _ in made])
    lines = [f"{args.rows:,} objects ({vertices:.0f} vertices, {wkb:.0f} bytes of WKB each on average), "
             f"{WRITE_BATCH} rows per write; then {4 * args.rows:,} for the memory",
             f"{'format':<9} {'write s':>8} {'rows/s':>9} {'size MB':>8} {'B/row':>6} {'read s':>7} "
             f"{'writer MB':>10} {'at 4x rows':>11}"]
    with tempfile.TemporaryDirectory(prefix="bench-writers-") as folder:
        batches_file = Path(folder) / "batches.pickle"
        batches_file.write_bytes(pickle.dumps(made))
        for suffix in WRITERS:
            path = Path(folder) / f"objects{suffix}"
            one, four = in_child(batches_file, path, args.rows), in_child(batches_file, path, 4 * args.rows)
            lines.append(f"{suffix[1:]:<9} {one['seconds']:>8.2f} {args.rows / one['seconds']:>9,.0f} "
                         f"{one['size'] / 1e6:>8.1f} {one['size'] / args.rows:>6.0f} {one['read']:>7.2f} "
                         f"{one['memory'] / 2**20:>10.0f} {four['memory'] / 2**20:>11.0f}")
    lines.append("write s: open to renamed into place, style included; size: data files (a Shapefile's .shp, .shx, "
                 ".dbf, .prj, .cpg); read s: geopandas, whole file; writer MB: peak RSS while writing over the RSS "
                 "before (fresh process each)")
    lines.append(f"1-minute load average before / after: {load:.2f} / {os.getloadavg()[0]:.2f} (2 cores)")
    publish("Output formats", f"python -m tests.benchmarks.bench_writers --rows {args.rows}", lines)


if __name__ == "__main__":
    main()
