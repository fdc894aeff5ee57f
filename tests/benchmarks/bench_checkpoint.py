"""Checkpoint files of a real Swin-T training run: the sizes `train` writes (the weights file a user shares and
the training state beside it) and what the integrity check (the CRC32 of every zip record) costs, in the
page cache and read from disk, alone and as part of `run`'s refusal of a damaged checkpoint.

`train` runs 1 iteration of configs/swin_t.yaml on two generated 64 px tiles: sizes depend on the model and
the optimizer, not on the data or the length of the run. "From disk" evicts the file's pages first
(posix_fadvise DONTNEED on that file alone).

    python -m tests.benchmarks.bench_checkpoint
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from model.checkpoint import check_intact, read_checkpoint, read_checkpoint_header, train_state_path
from tests.benchmarks.common import generate_scene, machine, publish
from tests.coco_fixtures import write_coco_tiles
from tests.test_checkpoint import flip_bytes_in_largest_tensor


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def median_seconds(action: Callable[[], object], repeat: int, before: Callable[[], None] = lambda: None) -> float:
    times = []
    for _ in range(repeat):
        before()
        t = time.perf_counter()
        action()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def wall(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    return time.perf_counter() - t, done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/aerial-bench-checkpoint")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"machine: {machine()}")

    write_coco_tiles(work / "tiles" / "train", n_images=2)
    weights = work / "swin_t.pt"
    subprocess.run([sys.executable, "-m", "pipeline", "train", "--config", "configs/swin_t.yaml", "--data",
                    str(work / "tiles"), "--out", str(weights), "--iters", "1", "--batch-size", "1"],
                   check=True, capture_output=True)
    state = train_state_path(weights)
    weights_mb, state_mb = weights.stat().st_size / 1e6, state.stat().st_size / 1e6

    n = args.repeat
    crc_warm = median_seconds(lambda: check_intact(weights), n)
    crc_cold = median_seconds(lambda: check_intact(weights), n, before=lambda: evict(weights))
    header_warm = median_seconds(lambda: read_checkpoint_header(weights), n)
    full_warm = median_seconds(lambda: read_checkpoint(weights), n)

    scene = generate_scene(work / "scene.tif", 512)
    damaged = work / "damaged.pt"
    shutil.copyfile(weights, damaged)
    flip_bytes_in_largest_tensor(damaged)
    run = [sys.executable, "-m", "pipeline", "run", str(scene), "-o", str(work / "out.gpkg"), "--checkpoint"]
    refused, missing = [], []
    for _ in range(n):
        seconds, done = wall([*run, str(damaged)])
        assert done.returncode == 2 and "damaged checkpoint" in done.stderr, done.stderr
        refused.append(seconds)
        seconds, done = wall([*run, str(work / "missing.pt")])  # the same driver start, no checkpoint to read
        assert done.returncode == 2 and "not found" in done.stderr, done.stderr
        missing.append(seconds)

    publish("Checkpoint files", "python -m tests.benchmarks.bench_checkpoint", [
        "train --out swin_t.pt (configs/swin_t.yaml, AdamW), sizes written:",
        f"  swin_t.pt              {weights.stat().st_size:>11,d} bytes  {weights_mb:6.1f} MB  (weights, config, classes)",
        f"  swin_t.train-state.pt  {state.stat().st_size:>11,d} bytes  {state_mb:6.1f} MB  (optimizer, schedule, "
        "iteration)",
        f"integrity check (CRC32 of every record) of swin_t.pt, median of {n}:",
        f"  page cache       {crc_warm * 1000:6.0f} ms",
        f"  from disk        {crc_cold * 1000:6.0f} ms",
        f"  read_checkpoint_header, check included (page cache)  {header_warm * 1000:6.0f} ms",
        f"  read_checkpoint, check included (page cache)         {full_warm * 1000:6.0f} ms",
        f"`run` refusing a damaged swin_t.pt (4 KB flipped), whole command: {statistics.median(refused):.2f} s "
        f"(median of {n}); refusing a missing checkpoint (nothing read): {statistics.median(missing):.2f} s",
    ])


if __name__ == "__main__":
    main()
