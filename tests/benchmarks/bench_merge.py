"""Seam-merge scaling: 10k, 30k and 100k synthetic objects with masks on a tiled scene, many cut by seams,
merged on one core by `merge_scene` (the whole scene's merge: what the workers' settling and the driver's
streamed merge compute together). Prints seconds per size, the candidate pairs examined and the fitted
growth exponent (seconds ~ detections^k), and the split of the same work between the workers (`settle_tile`,
each window's private objects) and the driver (the merge of what the windows left pending); writes them into
docs/benchmarks.md like the other benchmarks.

    python tests/benchmarks/bench_merge.py [--sizes 10000 30000 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: import this checkout's packages, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from pipeline.instances import Instance
from pipeline.merge import SeamRule, candidate_pairs, merge_scene, settle_tile
from pipeline.rect import Rect
from pipeline.windows import WindowGrid, plan_windows
from tests.benchmarks.common import machine, publish

TILE, OVERLAP = 512, 64
RULE = SeamRule()  # the default rule (class-agnostic, edge margin 2)
DENSITY = 0.0005  # objects per square pixel: 5 per 100 x 100 px, neighbours' boxes often overlap


def object_mask(h: int, w: int) -> np.ndarray:
    """An ellipse with a hole: irregular outline, not a box."""
    yy, xx = np.mgrid[0:h, 0:w]
    d = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2
    return (d <= 1) & (d >= 0.1)


def synthetic(n_objects: int, seed: int = 0) -> tuple[list[Instance], WindowGrid]:
    """Objects on a square scene sized for `n_objects` at DENSITY, each reported by every window that
    overlaps it as its fragment there, as a perfect model tiling the scene would report them (numbered per
    window as a worker numbers them); and the scene's windows. Objects are placed at random, so some overlap
    and rightly merge too."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n_objects / DENSITY))
    grid = plan_windows(side, side, TILE, OVERLAP)
    starts = np.array(grid.cols)  # the same offsets on both axes of a square scene
    sizes = rng.integers(8, 48, (n_objects, 2))
    origins = rng.integers(0, side - 48, (n_objects, 2))
    labels = rng.integers(1, 3, n_objects)
    instances = []
    count = np.zeros(len(grid), dtype=np.int64)  # detections so far per window: the next one's position
    for (h, w), (r, c), label in zip(sizes.tolist(), origins.tolist(), labels.tolist()):
        mask = object_mask(h, w)
        for i in np.flatnonzero((starts < r + h) & (starts + TILE > r)).tolist():
            for j in np.flatnonzero((starts < c + w) & (starts + TILE > c)).tolist():
                wr, wc = int(starts[i]), int(starts[j])
                r0, r1 = max(r, wr), min(r + h, wr + TILE)
                c0, c1 = max(c, wc), min(c + w, wc + TILE)
                part = mask[r0 - r:r1 - r, c0 - c:c1 - c]
                rows, cols = np.flatnonzero(part.any(axis=1)), np.flatnonzero(part.any(axis=0))
                if rows.size:
                    tile = i * len(grid.cols) + j
                    instances.append(Instance(row=r0 + int(rows[0]), col=c0 + int(cols[0]),
                                              mask=part[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy(),
                                              score=float(rng.random()), label=label,
                                              window=Rect(wc, wr, wc + TILE, wr + TILE), tile=tile,
                                              position=int(count[tile])))
                    count[tile] += 1
    return instances, grid


def split(instances: list[Instance], grid: WindowGrid) -> tuple[float, float, int, int]:
    """The same merge as the run does it: seconds settling every window (the workers' share, summed over
    windows), seconds merging what they left pending (the driver's), objects settled, detections pending."""
    by_tile: list[list[Instance]] = [[] for _ in range(len(grid))]
    for inst in instances:
        by_tile[inst.tile].append(inst)
    t = time.perf_counter()
    final, pending = [], []
    for tile, found in enumerate(by_tile):
        settled, waiting = settle_tile(found, grid, tile, RULE)
        final += settled
        pending += waiting
    workers = time.perf_counter() - t
    t = time.perf_counter()
    merge_scene(pending, grid, RULE)
    return workers, time.perf_counter() - t, len(final), len(pending)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    args = parser.parse_args()
    print(f"machine: {machine()} (merge is single-threaded)")
    detections, seconds = [], []
    lines = [f"load average (1 min) before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"]
    for n in args.sizes:
        instances, grid = synthetic(n)
        t, cpu = time.perf_counter(), time.process_time()
        merged = merge_scene(instances, grid, RULE)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
        pairs = len(candidate_pairs(instances, RULE))
        workers, driver, settled, pending = split(instances, grid)
        detections.append(len(instances))
        seconds.append(elapsed)
        lines.append(f"{n} objects -> {len(instances)} detections from {len(grid)} tiles "
                     f"({len(instances) - n} extra fragments across seams) -> "
                     f"{pairs} candidate pairs (n^2/2 = {len(instances) ** 2 // 2:.1e}) -> "
                     f"{len(merged)} merged in {elapsed:.2f} s (CPU {cpu:.2f} s)")
        lines.append(f"  as the run splits it: {settled} objects settled in the windows ({workers:.2f} s summed over "
                     f"windows, on the workers), {pending} detections pending -> merged in {driver:.2f} s (driver)")
    if len(detections) > 1:
        k = np.polyfit(np.log(detections), np.log(seconds), 1)[0]
        lines.append(f"fitted growth exponent (seconds ~ detections^k): k = {k:.2f}")
    lines.append(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")
    publish("Seam-merge scaling", "python tests/benchmarks/bench_merge.py", lines)


if __name__ == "__main__":
    main()
