"""Seam-merge scaling: 10k, 30k and 100k synthetic objects with masks on a tiled scene, many cut by seams,
merged on one core. Prints seconds per size, the candidate pairs examined and the fitted growth exponent
(seconds ~ detections^k), and writes them into docs/benchmarks.md like the other benchmarks.

    python tests/benchmarks/bench_merge.py [--sizes 10000 30000 100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script: import this checkout's packages, not an installed copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from pipeline.instances import Instance
from pipeline.merge import candidate_pairs, merge_instances
from pipeline.windows import axis_offsets
from tests.benchmarks.common import machine, publish

TILE, OVERLAP = 512, 64
DENSITY = 0.0005  # objects per square pixel: 5 per 100 x 100 px, neighbours' boxes often overlap


def object_mask(h: int, w: int) -> np.ndarray:
    """An ellipse with a hole: irregular outline, not a box."""
    yy, xx = np.mgrid[0:h, 0:w]
    d = ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2
    return (d <= 1) & (d >= 0.1)


def synthetic(n_objects: int, seed: int = 0) -> list[Instance]:
    """Objects on a square scene sized for `n_objects` at DENSITY, each reported by every window that
    overlaps it as its fragment there, as a perfect model tiling the scene would report them. Objects are
    placed at random, so some overlap and rightly merge too."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n_objects / DENSITY))
    starts = np.array(axis_offsets(side, TILE, OVERLAP))
    sizes = rng.integers(8, 48, (n_objects, 2))
    origins = rng.integers(0, side - 48, (n_objects, 2))
    labels = rng.integers(1, 3, n_objects)
    instances = []
    for (h, w), (r, c), label in zip(sizes.tolist(), origins.tolist(), labels.tolist()):
        mask = object_mask(h, w)
        for wr in starts[(starts < r + h) & (starts + TILE > r)].tolist():
            for wc in starts[(starts < c + w) & (starts + TILE > c)].tolist():
                r0, r1 = max(r, wr), min(r + h, wr + TILE)
                c0, c1 = max(c, wc), min(c + w, wc + TILE)
                part = mask[r0 - r:r1 - r, c0 - c:c1 - c]
                rows, cols = np.flatnonzero(part.any(axis=1)), np.flatnonzero(part.any(axis=0))
                if rows.size:
                    instances.append(Instance(row=r0 + int(rows[0]), col=c0 + int(cols[0]),
                                              mask=part[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy(),
                                              score=float(rng.random()), label=label, window=(wc, wr, TILE, TILE)))
    return instances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000])
    args = parser.parse_args()
    print(f"machine: {machine()} (merge is single-threaded)")
    detections, seconds, lines = [], [], []
    for n in args.sizes:
        instances = synthetic(n)
        windows = {inst.window for inst in instances}
        t = time.perf_counter()
        merged = merge_instances(instances, 0.5, 0.8)
        elapsed = time.perf_counter() - t
        pairs = len(candidate_pairs(instances))
        detections.append(len(instances))
        seconds.append(elapsed)
        lines.append(f"{n} objects -> {len(instances)} detections from {len(windows)} tiles "
                     f"({len(instances) - n} extra fragments across seams) -> "
                     f"{pairs} candidate pairs (n^2/2 = {len(instances) ** 2 // 2:.1e}) -> "
                     f"{len(merged)} merged in {elapsed:.2f} s")
    if len(detections) > 1:
        k = np.polyfit(np.log(detections), np.log(seconds), 1)[0]
        lines.append(f"fitted growth exponent (seconds ~ detections^k): k = {k:.2f}")
    publish("Seam-merge scaling", "python tests/benchmarks/bench_merge.py", lines)


if __name__ == "__main__":
    main()
