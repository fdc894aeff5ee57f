"""Overfit proof: does the training chain learn? Each backbone trains on the bundled SpaceNet tiles (quickstart.sh's
tiles and CPU configs, random weights) and is evaluated on those same training tiles every few iterations,
until segm AP50 and bbox AP50 both reach the target or a cap (iterations, minutes) ends the run.

A Mask R-CNN whose targets, masks, anchors, augmentations and post-processing are right memorises a handful of
tiles; one that cannot has a bug. This says nothing about how well either backbone generalises (no ImageNet
weights, 7 tiles): that is `compare` on a real data set.

    python -m tests.benchmarks.bench_overfit [--max-minutes 35] [--max-iters 3000] [--eval-every 25]

Writes docs/overfit.csv (one row per evaluation) and docs/overfit.png (loss and AP50 against iterations and
training time), and the "Overfit proof" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from model.config import load_config
from model.curves import Curves, plot_curves
from model.train import TrainOptions, train
from tests.benchmarks.bench_train import prepare
from tests.benchmarks.common import DOC, publish

CONFIGS = {"swin_t": "data/samples/swin_t_cpu.yaml", "resnet50": "data/samples/resnet50_cpu.yaml"}
CSV_FIELDS = ["backbone", "iteration", "seconds", "wall_seconds", "cpu_seconds", "loss", "bbox_AP50", "segm_AP50",
              "bbox_AP", "segm_AP"]


def proof_data(tiles: Path, work: Path) -> Path:
    """A data directory whose validation tiles are the training tiles: `train --validate` then scores
    memorisation."""
    proof = work / "proof"
    proof.mkdir(exist_ok=True)
    for name in ("train", "val"):
        link = proof / name
        if not link.exists():
            link.symlink_to((tiles / "train").resolve(), target_is_directory=True)
    return proof


class Watch:
    """The run's `stop_when`: prints each evaluation, stops once both AP50 reach the target or at the minutes cap."""

    def __init__(self, name: str, target: float, max_minutes: float):
        self.name, self.target, self.max_seconds = name, target, max_minutes * 60
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.trained = 0.0
        self.losses: list[float] = []
        self.points: list[dict[str, Any]] = []
        self.reached: dict[str, Any] | None = None

    def __call__(self, row: dict[str, Any]) -> bool:
        self.trained += row["seconds"]
        self.losses.append(row["loss"])
        wall = time.perf_counter() - self.start
        if "val" in row:
            cpu = time.process_time() - self.cpu_start
            val = row["val"]
            point = {"backbone": self.name, "iteration": row["iteration"], "seconds": round(self.trained, 1),
                     "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                     "loss": round(sum(self.losses) / len(self.losses), 4),
                     **{f"{kind}_{m}": round(val[kind][m], 4) for kind in ("bbox", "segm") for m in ("AP50", "AP")}}
            self.points.append(point)
            self.losses = []
            print(f"{self.name} it {point['iteration']:5d}  {self.trained / 60:5.1f} min steps  {wall / 60:5.1f} min "
                  f"wall  {cpu / 60:5.1f} CPU-min  loss {point['loss']:.3f}  bbox AP50 {point['bbox_AP50']:.3f}  "
                  f"segm AP50 {point['segm_AP50']:.3f}  bbox AP {point['bbox_AP']:.3f}  segm AP {point['segm_AP']:.3f}",
                  flush=True)
            if point["bbox_AP50"] >= self.target and point["segm_AP50"] >= self.target:
                self.reached = point
                return True
        return wall > self.max_seconds


def first_at(points: list[dict[str, Any]], level: float) -> str:
    """Where both AP50 first reach `level`: iteration and minutes of steps."""
    for p in points:
        if p["bbox_AP50"] >= level and p["segm_AP50"] >= level:
            return f"it {p['iteration']} ({p['seconds'] / 60:.1f} min)"
    return "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbones", nargs="+", choices=sorted(CONFIGS), default=["swin_t", "resnet50"])
    parser.add_argument("--target", type=float, default=0.5, help="segm and bbox AP50 on the training tiles")
    parser.add_argument("--eval-every", type=int, default=25, help="iterations between evaluations")
    parser.add_argument("--max-iters", type=int, default=3000, help="cap, and the length the schedule is set for")
    parser.add_argument("--max-minutes", type=float, default=35.0, help="cap per backbone, wall clock")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/aerial-bench-overfit")
    parser.add_argument("--out-dir", default=str(DOC.parent), help="where overfit.csv and overfit.png go")
    parser.add_argument("--no-publish", action="store_true", help="print, do not write docs/benchmarks.md")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir)
    tiles = work / "tiles"
    prepare(tiles)
    data = proof_data(tiles, work)
    coco = json.loads((tiles / "train" / "annotations.json").read_text())
    load_before = os.getloadavg()[0]
    lines = [f"{len(coco['images'])} SpaceNet train tiles of 256 px, {len(coco['annotations'])} buildings, random "
             f"initial weights, batch {args.batch_size}, seed {args.seed}; evaluated on the same tiles every "
             f"{args.eval_every} iterations; target: bbox and segm AP50 >= {args.target}; cap {args.max_iters} "
             f"iterations or {args.max_minutes:g} min wall per backbone; load average before: {load_before:.2f}"]
    print(lines[0], flush=True)
    runs, points = [], []
    for name in args.backbones:
        config = load_config(CONFIGS[name])
        options = TrainOptions(data=data, out=work / f"{name}.pt", iters=args.max_iters, batch_size=args.batch_size,
                               seed=args.seed, validate=True, validate_every=args.eval_every,
                               checkpoint_every=args.max_iters, progress=False)
        watch = Watch(name, args.target, args.max_minutes)
        summary = train(config, options, stop_when=watch)
        runs.append(Curves(name, summary["history"], summary["val"]))
        points += watch.points
        last = watch.points[-1]
        lr = config["optimizer"]["lr"] * args.batch_size / config["train"]["batch_size"]
        head = f"{name} ({CONFIGS[name]}, AdamW lr {lr:.1e}, {config['schedule']['warmup_iters']} warm-up its): "
        if watch.reached is not None:
            r = watch.reached
            lines.append(head + f"bbox AP50 {r['bbox_AP50']:.3f}, segm AP50 {r['segm_AP50']:.3f} at iteration "
                         f"{r['iteration']}, after {r['seconds'] / 60:.1f} min of optimizer steps "
                         f"({r['wall_seconds'] / 60:.1f} min wall with the evaluations; {r['cpu_seconds'] / 60:.1f} "
                         "CPU-min)")
        else:
            best = max(watch.points, key=lambda p: min(p["bbox_AP50"], p["segm_AP50"]))
            lines.append(head + f"target not reached within the cap: at iteration {last['iteration']} "
                         f"({last['seconds'] / 60:.1f} min of steps) bbox AP50 {last['bbox_AP50']:.3f}, segm AP50 "
                         f"{last['segm_AP50']:.3f}; best at it {best['iteration']}: {best['bbox_AP50']:.3f} / "
                         f"{best['segm_AP50']:.3f}")
        lines.append(f"  both AP50 >= 0.1: {first_at(watch.points, 0.1)}, >= 0.25: {first_at(watch.points, 0.25)}, "
                     f">= 0.5: {first_at(watch.points, 0.5)}; at the end: loss {last['loss']:.3f}, bbox AP "
                     f"{last['bbox_AP']:.3f}, segm AP {last['segm_AP']:.3f} (0.5:0.95); "
                     f"{summary['seconds_per_iter']:.2f} s/it with the evaluations")
        print("\n".join(lines[-2:]), flush=True)
    lines.append(f"load average after: {os.getloadavg()[0]:.2f} (2 cores shared with other jobs: the minutes vary "
                 "with the load, the iterations do not)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "overfit.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(points)
    figure = plot_curves(runs, out_dir / "overfit.png", metric="AP50", target=args.target, ap_label="training tiles",
                         title="Overfit proof: Mask R-CNN memorising 7 SpaceNet tiles from random weights (CPU)")
    shown = [os.path.relpath(f, DOC.parents[1]) for f in (out_dir / "overfit.csv", figure)]  # from the repository
    lines.append(f"curves: {shown[0]} (one row per evaluation), {shown[1]}")
    if args.no_publish:
        print("\n".join(lines))
        return
    publish("Overfit proof", "nice -n 19 python -m tests.benchmarks.bench_overfit " + " ".join(sys.argv[1:]), lines,
            figure=os.path.relpath(figure, DOC.parent))


if __name__ == "__main__":
    main()
