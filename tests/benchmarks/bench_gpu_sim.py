"""Is the model the only limit? `run` over several scenes in one job with a stand-in for a GPU model: a fixed
time per tile (sleeping, as a GPU forward takes wall time but no host CPU) and realistic dense output (about
46 building-sized objects per 512 px tile, many across seams).

Prints, for each time per tile and worker count: tiles/s, efficiency against the ideal (tiles x time per tile
/ workers: what the model alone would take), over the whole job and from the first batch on (the job's start,
before the first batch returns, is a one-time cost: Ray's first calls into a fresh actor); the driver's CPU ms
per tile (the whole process, and by thread: main, output, plan, other Python threads, Ray's native threads;
after a first job that takes the process's one-time costs, such as imports), the model workers' host CPU ms
per tile (the pipeline's share, the stand-in's own CPU apart; the scenes' short jobs, overview read and
quicklook, run there too), any other Ray workers' and Ray's daemons'; and where the model workers waited (before
their first call, between calls, after their last).

    python -m tests.benchmarks.bench_gpu_sim [--jobs 3x3072 1x8192] [--seconds 0.05 0.1] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

import psutil

from tests.benchmarks.common import publish
from tests.benchmarks.standin import StandIn, object_scene


def ray_processes() -> dict[str, list[psutil.Process]]:
    """This driver's Ray processes: workers (`ray::...`: the model actors, and any other: pooled processes
    that run tasks, which `run` no longer starts) and Ray's own daemons (GCS, raylet, agents)."""
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


class ThreadClock:
    """CPU seconds of each of this process's threads, by role, sampled every `period` s (a thread's time is
    gone from /proc once it ends, so the last sample before its end stands for it). Roles: the main thread
    (taking tiles, the seam merge), `output` (saving tiles, writing, the quicklook's outlines), `plan`
    (opening scenes ahead), other Python threads, and Ray's native threads (its core worker: receiving
    results, gRPC)."""

    ROLES: ClassVar[dict[str, str]] = {"MainThread": "main", "output": "output", "write ": "output", "plan": "plan"}

    def __init__(self, period: float = 0.05):
        self.period, self.seen = period, {}
        self.names: dict[int, str] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample_loop, name="thread-clock", daemon=True)

    def sample(self) -> None:
        self.names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})
        for t in psutil.Process().threads():
            self.seen[t.id] = t.user_time + t.system_time

    def sample_loop(self) -> None:
        while not self.stop.wait(self.period):
            self.sample()

    def __enter__(self) -> ThreadClock:
        self.sample()
        self.start = dict(self.seen)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()

    def role(self, tid: int) -> str:
        name = self.names.get(tid)
        if name is None:
            return "ray (native)"
        return next((role for prefix, role in self.ROLES.items() if name.startswith(prefix)), "other python")

    def by_role(self) -> Counter:
        """Seconds per role over the block, this sampler's own thread left out."""
        used: Counter = Counter()
        for tid, seconds in self.seen.items():
            if tid != self.thread.native_id:
                used[self.role(tid)] += seconds - self.start.get(tid, 0.0)
        return used

    def per_tile(self, tiles: int, digits: int = 1) -> str:
        """'driver X (main a, output b, ...)': CPU ms per tile of the whole process and of each role."""
        used = self.by_role()

        def ms(seconds: float) -> str:
            return f"{seconds / tiles * 1000:.{digits}f}"

        return (f"driver {ms(sum(used.values()))} ("
                + ", ".join(f"{role} {ms(used[role])}" for role in ("main", "output", "plan", "other python",
                                                                    "ray (native)")) + ")")


def standin_calls(log_dir: Path) -> dict[str, list[tuple[float, ...]]]:
    """Each model worker's calls: (CPU s, tiles, wall start, wall end), in order."""
    return {path.stem: sorted((tuple(map(float, line.split())) for line in path.read_text().splitlines()),
                              key=lambda call: call[2])
            for path in log_dir.glob("*.cpu")}


def model_idle(calls: dict[str, list[tuple[float, ...]]], start: float, end: float) -> str:
    """Where the model workers waited (wall s, mean over workers): before their first call, between calls
    (the pipeline not keeping up), after their last call until the job ended (the other workers' last
    batches, then the last scene's merge and writing: how long after the very last call the job ended)."""
    before = [c[0][2] - start for c in calls.values()]
    between = [sum(b[2] - a[3] for a, b in zip(c, c[1:])) for c in calls.values()]
    after = [end - c[-1][3] for c in calls.values()]
    return (f"model idle per worker: {sum(before) / len(before):.2f} s before its first call, "
            f"{sum(between) / len(between):.2f} s between calls, {sum(after) / len(after):.2f} s after its last "
            f"(the job ended {min(after):.2f} s after the last call)")


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
        with ThreadClock() as clock:
            t, t_wall = time.perf_counter(), time.time()
            summaries = list(run_scenes(scenes, predictor, pool, out_dir=out_dir, progress=False, **options))
            wall = time.perf_counter() - t
        start = min(s.timeline["first_tile"] for s in summaries) - (time.time() - time.perf_counter()) - t
        after = {kind: cpu_seconds(procs) for kind, procs in ray_processes().items()}
    used = {kind: sum(v - before.get(pid, 0.0) for pid, v in after[kind].items()) for kind in after}
    tiles = sum(s.tiles for s in summaries)
    objects = sum(s.merged_instances for s in summaries)
    ideal = tiles * seconds / workers
    # From the first batch on: the first result minus the model time of one batch.
    steady = wall - max(0.0, start - args.batch_size * seconds)
    calls = standin_calls(log_dir)
    standin = sum(call[0] for worker in calls.values() for call in worker)
    idle = model_idle(calls, t_wall, t_wall + wall)
    shutil.rmtree(out_dir), shutil.rmtree(log_dir)

    def per_tile(value: float) -> str:
        return f"{value / tiles * 1000:.1f}"

    return (f"{seconds * 1000:.0f} ms/tile, {workers} worker(s): {tiles} tiles, {objects} objects in {wall:.1f} s "
            f"(first result after {start:.2f} s): {tiles / wall:.1f} tiles/s (ideal {tiles / ideal:.1f}), "
            f"efficiency {ideal / wall:.2f}, from the first batch on {ideal / steady:.2f}; "
            f"CPU ms per tile: {clock.per_tile(tiles)}, "
            f"model workers {per_tile(used['actors'] - standin)} (+ stand-in {per_tile(standin)}), "
            f"other Ray workers {per_tile(used['tasks'])}, Ray daemons {per_tile(used['daemons'])}; {idle}")


def job_scenes(spec: str, workdir: Path) -> tuple[list[str], list[tuple[int, int, int]]]:
    """`NxSIZE`: N object scenes of SIZE^2 px (their paths, and their layouts for the stand-in)."""
    count, size = (int(v) for v in spec.lower().split("x"))
    layouts = [(size, seed, 1 + seed * (size // 75 + 1) ** 2) for seed in range(count)]
    return [str(object_scene(workdir / f"objects_{size}_{seed}.tif", size, seed, first))
            for size, seed, first in layouts], layouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", nargs="+", default=["3x3072", "1x8192"],
                        help="one job per NxSIZE: N scenes of SIZE^2 px (small scenes show the per-scene costs, a "
                             "large one the per-tile costs)")
    parser.add_argument("--seconds", type=float, nargs="+", default=[0.05, 0.1], help="model time per tile")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=8, help="tiles per model call (run's default on a GPU)")
    parser.add_argument("--output", choices=["compact", "dense"], default="compact",
                        help="the stand-in's output: compact (cropped masks) or torchvision's dense format")
    parser.add_argument("--workdir", default="/tmp/aerial-bench-gpu-sim")
    parser.add_argument("--no-publish", action="store_true")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = {spec: job_scenes(spec, workdir) for spec in args.jobs}
    load = os.getloadavg()
    lines = [(f"tile 512, overlap 64, batch {args.batch_size}, 1 thread per worker, stand-in output "
              f"{args.output}; load average before: {load[0]:.2f}")]
    # The process's first job also imports the writers (pyogrio imports pandas: ~1 s of CPU once per process)
    # and exports Ray's functions: a cost of starting, not of tiles. A first job on one scene takes it.
    scenes, layouts = next(iter(jobs.values()))
    one_job(scenes[:1], layouts, 0.01, 1, args, workdir)
    for scenes, layouts in jobs.values():
        lines.append(f"{len(layouts)} scene(s) of {layouts[0][0]}^2 px in one job:")
        print(lines[-1], flush=True)
        for seconds in args.seconds:
            for workers in args.workers:
                lines.append("  " + one_job(scenes, layouts, seconds, workers, args, workdir))
                print(lines[-1], flush=True)
    lines.append(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.no_publish:
        print("\n".join(lines))
    else:
        publish("GPU-speed simulation", " ".join(["python -m tests.benchmarks.bench_gpu_sim", *sys.argv[1:]]), lines)


if __name__ == "__main__":
    main()
