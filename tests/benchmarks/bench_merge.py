"""Seam-merge scaling: 10k, 30k and 100k synthetic instances with masks, many cut by seams, on one core.
Prints seconds per size and the fitted growth exponent (seconds ~ n^k).

    python -m tests.benchmarks.bench_merge [--sizes 10000 30000 100000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.instances import Instance
from pipeline.merge import merge_instances
from pipeline.windows import plan_windows
from tests.benchmarks.common import machine, publish

TILE, OVERLAP = 512, 64


def synthetic(n_objects: int, seed: int = 0) -> list[Instance]:
    """Objects on a square scene sized for ~n_objects at a fixed density, each seen by every window that
    overlaps it (its fragment there), as a perfect model tiling the scene would report them."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n_objects / 0.0003))  # ~3 objects per 100 x 100 px
    windows = plan_windows(side, side, TILE, OVERLAP)
    starts = np.array(sorted({int(w.col_off) for w in windows}))
    sizes = rng.integers(8, 40, (n_objects, 2))
    origins = rng.integers(0, side - 40, (n_objects, 2))
    instances = []
    for (h, w), (r, c) in zip(sizes, origins):
        mask = np.ones((h, w), dtype=bool)
        mask[h // 3:h // 2, w // 3:w // 2] = False  # a hole
        rows = starts[(starts <= r + h) & (starts + TILE > r)]
        cols = starts[(starts <= c + w) & (starts + TILE > c)]
        for wr in rows:
            for wc in cols:
                r0, r1 = max(r, wr), min(r + h, wr + TILE)
                c0, c1 = max(c, wc), min(c + w, wc + TILE)
                if r1 <= r0 or c1 <= c0:
                    continue
                part = mask[r0 - r:r1 - r, c0 - c:c1 - c]
                if part.any():
                    instances.append(Instance(row=int(r0), col=int(c0), mask=part.copy(), score=float(rng.random()),
                                              label=1, window=(int(wc), int(wr), TILE, TILE)))
    return instances


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    args = parser.parse_args()
    print(f"machine: {machine()} (merge is single-threaded)")
    sizes, seconds, lines = [], [], []
    for n in args.sizes:
        instances = synthetic(n)
        t = time.perf_counter()
        merged = merge_instances(instances, 0.5, 0.8)
        elapsed = time.perf_counter() - t
        sizes.append(len(instances))
        seconds.append(elapsed)
        lines.append(f"{n} objects -> {len(instances)} detections (fragments across seams included) -> "
                     f"{len(merged)} merged in {elapsed:.2f} s")
        print(lines[-1])
    if len(sizes) > 1:
        k = np.polyfit(np.log(sizes), np.log(seconds), 1)[0]
        lines.append(f"fitted growth exponent (seconds ~ detections^k): k = {k:.2f}")
    publish("Seam-merge scaling", "python -m tests.benchmarks.bench_merge", lines)


if __name__ == "__main__":
    main()
