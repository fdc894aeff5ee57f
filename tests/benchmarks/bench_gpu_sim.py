"""Is the model the only limit? `run` over several scenes in one job with a stand-in for a GPU model: a fixed
time per tile (sleeping, as a GPU forward takes wall time but no host CPU) and realistic dense output (about
46 building-sized objects per 512 px tile, many across seams).

Prints, for each time per tile and worker count: tiles/s, efficiency against the ideal (tiles x time per tile
/ workers: what the model alone would take), over the whole job and from the first batch on (the job's start,
before the first batch returns, is a one-time cost: Ray's first calls into a fresh actor); the driver's CPU ms
per tile (the whole process, and its main thread alone), the model workers' host CPU ms per tile (the
pipeline's share, the stand-in's own CPU apart), the other Ray workers' (per-scene tasks: overview read,
quicklook page) and Ray's daemons'.

    python -m tests.benchmarks.bench_gpu_sim [--scenes 3] [--size 3072] [--seconds 0.05 0.1] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from tests.benchmarks.common import publish
from tests.benchmarks.standin import StandIn, object_scene


def ray_processes() -> dict[str, list[psutil.Process]]:
    """This driver's Ray processes: workers (`ray::...`: the model actors, and the pooled processes that run
    tasks such as the overview read and the quicklook page) and Ray's own daemons (GCS, raylet, agents)."""
    found: dict[str, list[psutil.Process]] = {"actors": [], "tasks": [], "daemons": []}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        kind = "daemons" if not title.startswith("ray::") else "actors" if "TileWorker" in title else "tasks"
        found[kind].append(proc)
    return found


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    seconds = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            seconds[proc.pid] = t.user + t.system
        except psutil.Error:
            pass
    return seconds


def standin_cpu(log_dir: Path) -> float:
    return sum(float(line.split()[0]) for path in log_dir.glob("*.cpu") for line in path.read_text().splitlines())


def one_job(scenes: list[str], layouts, seconds: float, workers: int, args, workdir: Path) -> str:

    from pipeline.batch import run_scenes
    from pipeline.pool import RayPool
    from pipeline.settings import load_settings, settings_overrides

    log_dir = Path(tempfile.mkdtemp(dir=workdir))
    out_dir = Path(tempfile.mkdtemp(dir=workdir))
    options = {"tile": 512, "overlap": 64, "batch_size": args.batch_size, "workers": workers,
               "threads_per_worker": 1}
    predictor = StandIn(seconds, args.output == "compact", str(log_dir), layouts)
    with RayPool(predictor, load_settings(None, settings_overrides(options))) as pool:
        before = {pid: seconds for procs in ray_processes().values() for pid, seconds in cpu_seconds(procs).items()}
        t, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
        summaries = list(run_scenes(scenes, predictor, pool, out_dir=out_dir, progress=False, **options))
        wall, driver, main = time.perf_counter() - t, time.process_time() - cpu, time.thread_time() - main
        start = min(s.timeline["first_tile"] for s in summaries) - (time.time() - time.perf_counter()) - t
        after = {kind: cpu_seconds(procs) for kind, procs in ray_processes().items()}
    used = {kind: sum(v - before.get(pid, 0.0) for pid, v in after[kind].items()) for kind in after}
    tiles = sum(s.tiles for s in summaries)
    objects = sum(s.merged_instances for s in summaries)
    ideal = tiles * seconds / workers
    # From the first batch on: the first result minus the model time of one batch.
    steady = wall - max(0.0, start - args.batch_size * seconds)
    standin = standin_cpu(log_dir)
    shutil.rmtree(out_dir), shutil.rmtree(log_dir)

    def per_tile(value: float) -> str:
        return f"{value / tiles * 1000:.1f}"

    return (f"{seconds * 1000:.0f} ms/tile, {workers} worker(s): {tiles} tiles, {objects} objects in {wall:.1f} s "
            f"(first result after {start:.2f} s): {tiles / wall:.1f} tiles/s (ideal {tiles / ideal:.1f}), "
            f"efficiency {ideal / wall:.2f}, from the first batch on {ideal / steady:.2f}; "
            f"CPU ms per tile: driver {per_tile(driver)} (main thread {per_tile(main)}), "
            f"model workers {per_tile(used['actors'] - standin)} (+ stand-in {per_tile(standin)}), "
            f"per-scene tasks {per_tile(used['tasks'])}, Ray daemons {per_tile(used['daemons'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--seconds", type=float, nargs="+", default=[0.05, 0.1], help="model time per tile")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", choices=["compact", "dense"], default="compact",
                        help="the stand-in's output: compact (cropped masks) or torchvision's dense format")
    parser.add_argument("--workdir", default="/tmp/aerial-bench-gpu-sim")
    parser.add_argument("--no-publish", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    layouts = [(args.size, seed, 1 + seed * (args.size // 75 + 1) ** 2) for seed in range(args.scenes)]
    scenes = [str(object_scene(workdir / f"objects_{args.size}_{seed}.tif", size, seed, first))
              for size, seed, first in layouts]
    load = os.getloadavg()
    lines = [f"{args.scenes} scenes of {args.size}^2 px in one job, tile 512, overlap 64, batch {args.batch_size}, "
             f"1 thread per worker, stand-in output {args.output}; load average before: {load[0]:.2f}"]
    for seconds in args.seconds:
        for workers in args.workers:
            lines.append(one_job(scenes, layouts, seconds, workers, args, workdir))
            print(lines[-1], flush=True)
    lines.append(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.no_publish:
        print("\n".join(lines))
    else:
        publish("GPU-speed simulation", "python -m tests.benchmarks.bench_gpu_sim", lines)


if __name__ == "__main__":
    main()
