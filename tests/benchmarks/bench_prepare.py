"""`prepare` in one process against Ray tasks, timed end to end as a user runs it (`python -m pipeline prepare`,
interpreter and Ray start-up included), on generated uint8 RGB scenes with random polygon labels. Also the
bare cost of starting Ray in-process and running one task, and the cutting alone with Ray already up. Each
output is checked to be byte-identical to the one-process output.

    python -m tests.benchmarks.bench_prepare [--size 2048] [--scenes 3] [--workers 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
from shapely.geometry import Polygon

from tests.benchmarks.common import generate_scene, publish

ORIGIN = (500000.0, 4000000.0)  # generate_scene's upper-left corner, 0.5 m pixels


def write_labels(path: Path, size: int, count: int, seed: int = 0) -> None:
    """`count` random quadrilaterals of 5-25 m over the scenes' extent, two classes."""
    rng = np.random.default_rng(seed)
    polys = []
    for _ in range(count):
        cx, cy = rng.uniform(0, size * 0.5, 2)
        r = rng.uniform(2.5, 12.5, 4)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 4))
        polys.append(Polygon([(ORIGIN[0] + cx + ri * np.cos(a), ORIGIN[1] - cy + ri * np.sin(a))
                              for ri, a in zip(r, angles)]))
    kinds = rng.choice(["building", "tree"], count)
    gpd.GeoDataFrame({"kind": kinds}, geometry=polys, crs="EPSG:32616").to_file(path)


def timed_prepare(scenes: list[Path], labels: Path, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pipeline", "prepare", *map(str, scenes), "--labels", str(labels),
               "--class-field", "kind", "--out", str(out), "--workers", str(workers)]
    t = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def ray_start_seconds() -> float:
    """Start Ray in-process the way prepare does, run one trivial task, shut down (in a fresh interpreter)."""
    script = ("import time; t = time.perf_counter(); import ray; from core.cluster import ray_session\n"
              "with ray_session(None):\n    ray.get(ray.remote(lambda: 1).remote())\n"
              "print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def cutting_seconds(scenes: list[Path], labels: Path, out: Path, workers: int) -> float:
    """prepare() alone, in this process, with Ray already started for workers > 1: the cutting itself."""
    import ray

    from core.cluster import ray_session
    from pipeline.training_data.prepare import prepare
    from pipeline.settings import load_settings

    shutil.rmtree(out, ignore_errors=True)
    settings = load_settings(overrides={"prepare": {"class_field": "kind", "workers": workers}})
    with ray_session(None) if workers > 1 else contextlib.nullcontext():
        if workers > 1:
            ray.get(ray.remote(lambda: 1).remote())
        with contextlib.redirect_stdout(io.StringIO()):
            t = time.perf_counter()
            prepare(list(map(str, scenes)), str(labels), out, settings, progress=False)
            return time.perf_counter() - t


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(a / d, b / d) for d in cmp.common_dirs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--labels-per-scene", type=int, default=400)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/aerial-bench-prepare")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scenes = [generate_scene(work / f"scene{i}_{args.size}.tif", args.size, seed=i) for i in range(args.scenes)]
    labels = work / f"labels_{args.size}.gpkg"
    write_labels(labels, args.size, args.labels_per_scene)

    load_before = os.getloadavg()[0]
    lines = [f"{args.scenes} x {args.size}^2 uint8 RGB scenes, {args.labels_per_scene} polygons over their extent, "
             f"tile 512, overlap 64; seconds per `python -m pipeline prepare` run, {args.repeats} runs each"]
    starts = [ray_start_seconds() for _ in range(args.repeats)]
    lines.append(f"Ray start in-process + one task + shutdown: {', '.join(f'{s:.1f}' for s in starts)} s")
    best: dict[int, float] = {}
    for workers in args.workers:
        times = [timed_prepare(scenes, labels, work / f"out_w{workers}", workers) for _ in range(args.repeats)]
        best[workers] = min(times)
        mode = "one process" if workers == 1 else f"Ray, {workers} workers"
        same = "" if workers == args.workers[0] else (
            ", output identical" if same_tree(work / f"out_w{args.workers[0]}", work / f"out_w{workers}")
            else ", OUTPUT DIFFERS")
        lines.append(f"--workers {workers} ({mode}): {', '.join(f'{t:.1f}' for t in times)} s{same}")
    alone = {w: cutting_seconds(scenes, labels, work / "out_alone", w) for w in args.workers}
    lines.append("cutting alone (prepare() with Ray already up): " + ", ".join(
        f"{w} workers {t:.1f} s ({alone[args.workers[0]] / t:.2f}x)" for w, t in alone.items()))
    lines.append(f"1-minute load average before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
                 f"(the runs themselves add 1-2; more before them means other jobs shared the {os.cpu_count()} cores)")
    base = best[args.workers[0]]
    lines.append("speed-up (best run): " + ", ".join(f"{w} workers {base / t:.2f}x" for w, t in best.items()))
    command = "python -m tests.benchmarks.bench_prepare " + " ".join(sys.argv[1:])
    publish(f"Prepare on Ray ({args.scenes} x {args.size}^2)", command.strip(), lines)


if __name__ == "__main__":
    main()
