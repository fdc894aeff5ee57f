"""On a CUDA machine: is the model the only limit of `run`? The real Swin-T Mask R-CNN (random weights, the
same cost per forward as trained ones) in a plain loop of forwards over a scene's tiles, held in memory,
against `run` on the same scene (reading, settling, polygonizing, merging and writing included): tiles/s of
each and their ratio. The goal is a ratio of at least 0.9.

    python -m tests.benchmarks.bench_gpu [--size 6144] [--batch-size 8] [--precision auto] [--workers 1]

Without CUDA it stops at once with one line (this project's development machines have no GPU).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.benchmarks.common import generate_scene, machine, publish


def plain_loop(checkpoint: str, scene: str, tile: int, overlap: int, batch_size: int, precision: str,
               score: float) -> tuple[int, float]:
    """Every window read and normalized beforehand (pinned host memory), then the timed forwards, batch after
    batch, the compact output on the host as `run` gets it: what the GPU alone can do."""
    import torch

    from pipeline.predict import CheckpointPredictor
    from pipeline.raster import compute_scaling, normalize, open_scene, read_window, resolve_bands
    from pipeline.settings import load_settings
    from pipeline.windows import plan_windows

    info = open_scene(scene)
    settings = load_settings(overrides={"tile": tile, "overlap": overlap})
    bands = resolve_bands(None, info.count, scene, info.alpha)
    scaling = compute_scaling(scene, info, settings, bands)
    tiles = [torch.from_numpy(normalize(read_window(scene, w, bands, info.nodata)[0], scaling)).pin_memory()
             for w in plan_windows(info.width, info.height, tile, overlap)]
    predictor = CheckpointPredictor(checkpoint, "cuda", score, precision=precision)
    predictor(tiles[:batch_size])  # warm-up: cuDNN's algorithm search, the allocator
    torch.cuda.synchronize()
    t = time.perf_counter()
    for start in range(0, len(tiles), batch_size):
        predictor(tiles[start:start + batch_size])
    torch.cuda.synchronize()
    return len(tiles), time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=6144)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--workers", type=int, default=1, help="GPU workers for run (one GPU each)")
    parser.add_argument("--backbone", default="swin_t")
    parser.add_argument("--workdir", default="/tmp/aerial-bench-gpu")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2

    from model.builder import build_model
    from model.checkpoint import save_checkpoint
    from core.cluster import shutdown_ray, start_local_ray
    from model.config import load_config
    from pipeline.run import run_scene
    from pipeline.settings import load_settings

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    scene = str(generate_scene(work / f"scene_{args.size}.tif", args.size))
    torch.manual_seed(0)
    config = load_config(overrides={"classes": ["square"], "model": {"backbone": {"name": args.backbone}}})
    checkpoint = work / f"{args.backbone}_random.pt"
    save_checkpoint(checkpoint, build_model(config), config, ["square"])
    score = load_settings().run.score_threshold
    gpu = torch.cuda.get_device_name(0)

    tiles, plain = plain_loop(str(checkpoint), scene, args.tile, args.overlap, args.batch_size, args.precision, score)
    lines = [f"{args.backbone} Mask R-CNN (random weights) on {gpu}, {args.size}^2 px scene, tile {args.tile}, "
             f"overlap {args.overlap}, batch {args.batch_size}, precision {args.precision}",
             f"plain loop of forwards (tiles in memory): {tiles} tiles in {plain:.1f} s ({tiles / plain:.1f} tiles/s "
             f"per GPU)"]
    print(lines[-1], flush=True)
    start_local_ray(num_cpus=max(2, torch.get_num_threads()))
    try:
        t = time.perf_counter()
        summary = run_scene(scene, work / "run.gpkg", checkpoint=str(checkpoint), device="cuda",
                            precision=args.precision, tile=args.tile, overlap=args.overlap,
                            batch_size=args.batch_size, workers=args.workers, gpus_per_worker=1, overwrite=True,
                            progress=False)
        wall = time.perf_counter() - t
    finally:
        shutdown_ray()
    lines.append(f"run, {args.workers} GPU worker(s): {summary.tiles} tiles in {wall:.1f} s "
                 f"({summary.tiles / wall:.1f} tiles/s; model load and scene planning included), "
                 f"{summary.merged_instances} objects")
    lines.append(f"ratio run / plain loop, tiles/s per GPU: {(summary.tiles / wall / args.workers) / (tiles / plain):.2f}")
    publish("GPU: run against a plain loop", "python -m tests.benchmarks.bench_gpu " + " ".join(sys.argv[1:]),
            [f"machine: {machine()}", *lines])
    return 0


if __name__ == "__main__":
    sys.exit(main())
