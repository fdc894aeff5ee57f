"""Training throughput on this machine: one process against Ray Train with 1 and 2 workers, on the bundled
SpaceNet sample (quickstart.sh's tiles and CPU config), the same batch per worker, threads set so the
workers share the cores without oversubscribing them. Each setup runs the real command line; iterations/s
come from the training loop's own clock (data loading, steps and checkpoints; Ray's start-up excluded),
the step median from OUT.losses.csv.

    python -m tests.benchmarks.bench_train [--iters 20] [--batch-size 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.benchmarks.common import machine, publish

SAMPLE = Path("data/samples/spacenet_atlanta")


def prepare(tiles: Path) -> list[str]:
    command = [sys.executable, "-m", "pipeline", "prepare", str(SAMPLE / "sample_geotiff.tif"), "--labels",
               str(SAMPLE / "geotiff_labels.geojson"), "--class-name", "building", "--tile", "256", "--overlap",
               "32", "--out", str(tiles), "--overwrite"]
    subprocess.run(command, check=True, capture_output=True)
    return command


def train(command: list[str], out: Path) -> dict[str, float]:
    """Run one training command; its loop seconds per iteration, median step seconds and wall seconds."""
    t = time.perf_counter()
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    with out.with_name(out.stem + ".losses.csv").open() as f:
        steps = [float(r["seconds"]) for r in csv.DictReader(f)][1:]  # the first step warms up
    return {"loop": summary["seconds_per_iter"], "step": statistics.median(steps), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/aerial-bench-train")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    print(f"machine: {machine()}")
    tiles = work / "tiles"
    prepare(tiles)
    n_tiles = len(json.loads((tiles / "train" / "annotations.json").read_text())["images"])
    setups = [("1 process", 1, []),
              ("Ray Train, 1 worker", 1, ["--workers", "1", "--threads-per-worker", str(cores)]),
              ("Ray Train, 2 workers", 2, ["--workers", "2", "--threads-per-worker", str(max(1, cores // 2))])]
    lines = [f"swin_t Mask R-CNN (data/samples/swin_t_cpu.yaml, random weights), {n_tiles} SpaceNet train tiles "
             f"of 256 px, {args.iters} iterations, batch {args.batch_size} per worker"]
    print(lines[0])
    for name, workers, flags in setups:
        out = work / f"{name.replace(' ', '_').replace(',', '')}.pt"
        command = [sys.executable, "-m", "pipeline", "train", "--config", "data/samples/swin_t_cpu.yaml", "--data",
                   str(tiles), "--out", str(out), "--iters", str(args.iters), "--batch-size", str(args.batch_size),
                   *flags]
        r = train(command, out)
        images = workers * args.batch_size
        threads = cores if workers == 1 else max(1, cores // 2)
        lines.append(f"{name} x {threads} threads: {1 / r['loop']:.3f} it/s, {images / r['loop']:.2f} images/s "
                     f"(loop {r['loop']:.2f} s/it incl. data and checkpoints; median step {r['step']:.2f} s = "
                     f"{images / r['step']:.2f} images/s; command {r['wall']:.0f} s with start-up)")
        lines.append("  " + " ".join(["python"] + command[1:]).replace(str(work) + "/", ""))
        print("\n".join(lines[-2:]))
    publish("Training throughput", "python -m tests.benchmarks.bench_train " + " ".join(sys.argv[1:]), lines)


if __name__ == "__main__":
    main()
