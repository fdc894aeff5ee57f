"""Pipeline overhead: `run` (Ray actor, windowed reads, normalize, merge, polygonize, write) against a plain
loop of model forwards over the same tiles, same model, same batch size, same threads. Also tiles/s with 1
and 2 workers: sharing the machine's cores (threads per worker = cores / workers), and at a fixed size per
worker (cores / 2 threads each), which is how workers add up when each has its own GPU or node.

    python -m tests.benchmarks.bench_overhead [--size 3072] [--backbone swin_t] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.predict import CheckpointPredictor
from pipeline.raster import compute_scaling, normalize, open_scene, read_window, resolve_bands
from pipeline.settings import load_settings
from pipeline.windows import plan_windows
from tests.benchmarks.common import generate_scene, machine, publish


def plain_loop(scene: str, checkpoint: str, tile: int, overlap: int, batch_size: int, threads: int,
               score_threshold: float) -> None:
    """What a user would write by hand: load the model, read every window, forward in batches.

    With the run's `score_threshold` the model is the one `run` uses (masks only for detections it keeps),
    so the ratio is the pipeline's overhead alone; with 0 it is torchvision's default (a mask for every
    detection over 0.05), which shows what skipping those masks saves.
    """
    import torch

    torch.set_num_threads(threads)
    predictor = CheckpointPredictor(checkpoint, score_threshold=score_threshold)
    predictor.load()
    info = open_scene(scene)
    settings = load_settings(overrides={"tile": tile, "overlap": overlap})
    bands = resolve_bands(None, info.count, scene, info.alpha)
    scaling = compute_scaling(scene, info, settings, bands)
    windows = plan_windows(info.width, info.height, tile, overlap)
    for start in range(0, len(windows), batch_size):
        batch = []
        for window in windows[start:start + batch_size]:
            raw, _ = read_window(scene, window, bands, info.nodata, info.masked)
            batch.append(torch.from_numpy(normalize(raw, scaling)))
        predictor(batch)


def timed_plain_loop(args: argparse.Namespace, checkpoint: Path, threads: int, score_threshold: float) -> float:
    """Seconds of the plain loop as a script of its own: a fresh process, imports included, as `run`'s
    worker process pays them too."""
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_overhead", "--plain-loop", "--size", str(args.size),
                    "--tile", str(args.tile), "--overlap", str(args.overlap), "--batch-size", str(args.batch_size),
                    "--workdir", args.workdir, "--checkpoint", str(checkpoint), "--threads", str(threads),
                    "--score-threshold", str(score_threshold)], check=True, cwd=Path(__file__).resolve().parents[2])
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=3072)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--backbone", default="swin_t")
    parser.add_argument("--workdir", default="/tmp/aerial-bench")
    parser.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)  # the timed child
    parser.add_argument("--checkpoint"), parser.add_argument("--threads", type=int)
    parser.add_argument("--score-threshold", type=float)
    args = parser.parse_args()
    if args.plain_loop:
        return plain_loop(str(generate_scene(Path(args.workdir) / f"scene_{args.size}.tif", args.size)),
                          args.checkpoint, args.tile, args.overlap, args.batch_size, args.threads,
                          args.score_threshold)
    import torch

    from model.builder import build_model
    from model.checkpoint import save_checkpoint
    from core.cluster import shutdown_ray, start_local_ray
    from model.config import load_config
    from pipeline.run import run_scene

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    print(f"machine: {machine()}")
    scene = str(generate_scene(work / f"scene_{args.size}.tif", args.size))
    torch.manual_seed(0)
    config = load_config(overrides={"classes": ["square"], "model": {"backbone": {"name": args.backbone}}})
    checkpoint = work / f"{args.backbone}_random.pt"
    save_checkpoint(checkpoint, build_model(config), config, ["square"])

    score = load_settings().run.score_threshold
    n_tiles = len(plan_windows(args.size, args.size, args.tile, args.overlap))
    lines = [f"{args.backbone} Mask R-CNN (random weights), {args.size}^2 px scene, tile {args.tile}, "
             f"overlap {args.overlap}, batch {args.batch_size}, score threshold {score}"]
    default = timed_plain_loop(args, checkpoint, cores, 0.0)
    lines.append(f"plain loop, torchvision's default model (a mask for every detection over 0.05): {n_tiles} tiles "
                 f"in {default:.1f} s ({n_tiles / default:.2f} tiles/s)")
    print(lines[-1])
    plain = timed_plain_loop(args, checkpoint, cores, score)
    lines.append(f"plain loop, the model as run uses it (masks only for detections >= {score}): {n_tiles} tiles "
                 f"in {plain:.1f} s ({n_tiles / plain:.2f} tiles/s); {default / plain:.2f}x the default's tiles/s")
    print(lines[-1])

    start_local_ray(num_cpus=cores)
    try:
        timings = {}
        per_worker = max(1, cores // 2)
        for workers, threads in ((1, cores), (2, per_worker), (1, per_worker)):
            t = time.perf_counter()
            summary = run_scene(scene, work / f"overhead_{workers}x{threads}.gpkg", checkpoint=str(checkpoint),
                                tile=args.tile, overlap=args.overlap, batch_size=args.batch_size, workers=workers,
                                threads_per_worker=threads, overwrite=True, progress=False)
            timings[workers, threads] = time.perf_counter() - t
            lines.append(f"run, {workers} worker(s) x {threads} threads: {timings[workers, threads]:.1f} s "
                         f"({n_tiles / timings[workers, threads]:.2f} tiles/s); stages: "
                         + ", ".join(f"{k} {v:.1f} s" for k, v in summary.seconds.items()))
            print(lines[-1])
        lines.append(f"overhead ratio run (1 worker, {cores} threads) / plain loop of the same model: "
                     f"{timings[1, cores] / plain:.3f} (both include starting a process, importing torch and "
                     "loading the model; Ray itself was started before either clock)")
        lines.append(f"scaling, tiles/s with 2 workers x {per_worker} / 1 worker x {cores} threads (the same cores): "
                     f"{timings[1, cores] / timings[2, per_worker]:.2f}")
        lines.append(f"scaling, tiles/s with 2 workers / 1 worker, {per_worker} threads each (as when adding a "
                     f"GPU or a node per worker): {timings[1, per_worker] / timings[2, per_worker]:.2f}")
        publish("Overhead and worker scaling", "python -m tests.benchmarks.bench_overhead " + " ".join(sys.argv[1:]),
                lines)
    finally:
        shutdown_ray()


if __name__ == "__main__":
    main()
