"""Peak memory (driver, Ray's daemons and workers: RSS and PSS summed) of `run` on generated 5 000^2 and 20 000^2 px scenes with a
cheap predictor: memory must not grow with the scene.

    python -m tests.benchmarks.bench_memory [--sizes 5000 20000] [--workdir /tmp/bench]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from core.cluster import shutdown_ray, start_local_ray
from pipeline.run import run_scene
from tests.benchmarks.common import BrightSquares, PeakMemory, generate_scene, machine, publish


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--workdir", default="/tmp/aerial-bench")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}")
    start_local_ray(num_cpus=2)
    try:
        results, lines = {}, []
        for size in args.sizes:
            t = time.perf_counter()
            scene = generate_scene(work / f"scene_{size}.tif", size)
            print(f"scene {size}^2 ready ({time.perf_counter() - t:.0f} s)")
            out = work / f"out_{size}.gpkg"
            with PeakMemory() as mem:
                t = time.perf_counter()
                summary = run_scene(str(scene), out, predictor=BrightSquares(), tile=512, overlap=64,
                                    batch_size=4, workers=args.workers, threads_per_worker=1, overwrite=True)
                seconds = time.perf_counter() - t
            results[size] = mem.peak_pss
            lines.append(f"{size}^2 px, {args.workers} worker: {summary.tiles} tiles, {summary.merged_instances} "
                         f"instances, {seconds:.0f} s, peak memory of the driver, Ray's daemons and workers: "
                         f"PSS {mem.peak_pss / 2**20:.0f} MiB (RSS {mem.peak / 2**20:.0f} MiB)")
            print(lines[-1])
        if len(results) > 1:
            small, large = min(results), max(results)
            lines.append(f"peak memory (PSS) ratio {large}^2 / {small}^2: {results[large] / results[small]:.2f}")
        publish("Memory", "python -m tests.benchmarks.bench_memory " + " ".join(sys.argv[1:]), lines)
    finally:
        shutdown_ray()


if __name__ == "__main__":
    main()
