"""Against SAHI: the same torchvision model, scene, tile size and overlap.

1. Speed and memory: Swin-T Mask R-CNN (random weights) on a generated scene; wall time and peak memory of
   each tool (ours: the driver, Ray's daemons and workers; SAHI: its process, which holds the whole image),
   ours as one worker x 2 threads and as two workers x 1 thread (the README's advice for CPUs).
2. Memory against scene size: the same bright-region 'model' in both tools on generated 5 000^2 and
   20 000^2 px scenes, so what grows with the scene shows.
3. Seams: a deterministic 'model' (bright regions -> masks, wrapped as a torch module so SAHI runs it like
   any torchvision model) on a scene of bright rectangles 60, 150 and 300 px long laid across tile seams
   and corners; counts, per length, the objects that come out split (more than one output overlapping one
   true object) or duplicated.

SAHI is installed only in the benchmark environment:
    python -m venv --system-site-packages /tmp/sahi-venv && /tmp/sahi-venv/bin/pip install sahi
    python -m tests.benchmarks.bench_sahi --sahi-python /tmp/sahi-venv/bin/python [--sizes 2048 4096]
        [--memory-sizes 5000 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import rasterio
import rasterio.features
from affine import Affine

REPO = Path(__file__).resolve().parents[2]
TILE, OVERLAP, SCORE = 512, 64, 0.5


LENGTHS = (60, 150, 300)  # across the seam; the overlap is 64 px


def seam_scene(path: Path, size: int) -> list[dict]:
    """Dark scene with bright 60 px wide rectangles across every seam and square blocks on every corner.

    Rectangles crossing a horizontal seam are tall, those crossing a vertical seam wide; their length across
    the seam cycles through LENGTHS, so some fit inside the 64 px overlap and some are cut by both tiles'
    edges. Returns the true objects: {"box": (r0, c0, r1, c1), "length": px}.
    """
    image = np.full((3, size, size), 50, dtype=np.uint8)
    stride = TILE - OVERLAP
    seams = [k * stride + OVERLAP // 2 for k in range(1, size // stride + 1)]  # centres of the overlap bands
    seams = [s for s in seams if s + max(LENGTHS) // 2 < size]
    middles = [s - stride // 2 for s in seams] + [seams[-1] + stride // 2] if seams else []
    middles = [m for m in middles if m + 30 < size]
    objects = []

    def paint(r: int, c: int, height: int, width: int, length: int) -> None:
        r0, c0 = r - height // 2, c - width // 2
        image[:, r0:r0 + height, c0:c0 + width] = 240
        objects.append({"box": (r0, c0, r0 + height, c0 + width), "length": length})

    for i, seam in enumerate(seams):
        for j, middle in enumerate(middles):
            length = LENGTHS[(i + j) % len(LENGTHS)]
            paint(seam, middle, length, 60, length)  # tall, across a horizontal seam
            paint(middle, seam, 60, length, length)  # wide, across a vertical seam
        for j, other in enumerate(seams):
            length = LENGTHS[(i + j) % 2]  # 60 or 150 px squares on the corners, where four tiles meet
            paint(seam, other, length, length, length)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        dst.write(image)
    return objects


def full_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A SAHI mask as a scene-sized boolean array (SAHI may return it cropped at the top left)."""
    full = np.zeros(shape, dtype=bool)
    full[:mask.shape[0], :mask.shape[1]] = mask[:shape[0], :shape[1]]
    return full


def count_outputs(masks: Iterable[np.ndarray], truth: list[dict]) -> dict:
    """Per true object, how many output masks touch it: 1 is right, >1 split or duplicated, 0 missed."""
    touching, outputs = [0] * len(truth), 0
    for mask in masks:
        outputs += 1
        for k, obj in enumerate(truth):
            r0, c0, r1, c1 = obj["box"]
            if mask[r0:r1, c0:c1].any():
                touching[k] += 1
    per_length = {}
    for length in sorted({obj["length"] for obj in truth}):
        counts = [t for t, obj in zip(touching, truth) if obj["length"] == length]
        per_length[str(length)] = {"objects": len(counts), "exactly_one": sum(t == 1 for t in counts),
                                   "split_or_duplicated": sum(t > 1 for t in counts),
                                   "missed": sum(t == 0 for t in counts)}
    return {"outputs": outputs, "per_length": per_length}


def child(args: argparse.Namespace) -> None:
    """Run one tool in this (fresh) process and print a JSON line."""
    from tests.benchmarks.common import PeakMemory

    with PeakMemory() as mem:
        t = time.perf_counter()  # both clocks include loading the model, as a user's run does
        if args.tool == "ours":
            from core.cluster import shutdown_ray, start_local_ray
            from pipeline.run import run_scene

            start_local_ray(num_cpus=2)
            started = time.perf_counter() - t
            out = Path(args.workdir) / f"ours_{args.part}.gpkg"
            if args.part == "seams":
                from tests.benchmarks.torch_models import BrightRegions

                kwargs: dict = {"predictor": BrightRegions()}
            elif args.part == "memory":  # the same cheap 'model' as a plain callable: no torch in the driver
                from tests.benchmarks.common import BrightSquares

                kwargs = {"predictor": BrightSquares()}
            else:  # the driver reads only the checkpoint's header: no torch in this process
                kwargs = {"checkpoint": args.checkpoint}
            run_scene(args.scene, out, tile=TILE, overlap=OVERLAP, batch_size=2, scaling="divide255",
                      score_threshold=SCORE, overwrite=True, progress=False, workers=args.workers,
                      threads_per_worker=args.threads, layer="result", **kwargs)
            shutdown_ray()
            seconds = time.perf_counter() - t
            import geopandas as gpd

            outputs = gpd.read_file(out, layer="result").geometry
        else:
            import torch
            from sahi.models.torchvision import TorchVisionDetectionModel
            from sahi.predict import get_sliced_prediction

            from tests.benchmarks.torch_models import BrightRegions, SahiRepresentable

            torch.set_num_threads(args.threads)
            model = SahiRepresentable(torch.load(args.model, weights_only=False) if args.part == "speed"
                                      else BrightRegions(), SCORE)
            model.eval()
            with rasterio.open(args.scene) as src:
                image = np.moveaxis(src.read(), 0, -1)  # SAHI works on the whole image in memory
            wrapped = TorchVisionDetectionModel(model=model, confidence_threshold=SCORE, device="cpu",
                                                category_mapping={"1": "object"}, load_at_init=True)
            result = get_sliced_prediction(image, wrapped, slice_height=TILE, slice_width=TILE,
                                           overlap_height_ratio=OVERLAP / TILE, overlap_width_ratio=OVERLAP / TILE,
                                           perform_standard_pred=False, verbose=0)
            seconds, started = time.perf_counter() - t, 0.0
            outputs = [p.mask for p in result.object_prediction_list if p.mask is not None]  # polygons
        peak, peak_pss = mem.peak, mem.peak_pss  # the tool's own work only: counting rasterizes outputs below
    report = {"tool": args.tool, "part": args.part, "seconds": seconds, "ray_start": started,
              "peak_mib": peak / 2**20, "peak_pss_mib": peak_pss / 2**20, "outputs": len(outputs)}
    if args.part == "seams":
        with rasterio.open(args.scene) as src:
            shape, transform = src.shape, src.transform
        report.update(count_outputs(
            (rasterio.features.rasterize([o], out_shape=shape, transform=transform).astype(bool)
             if args.tool == "ours" else full_mask(o.bool_mask, shape) for o in outputs),
            json.loads(Path(args.truth).read_text())))
    print("RESULT " + json.dumps(report))


def describe(name: str, r: dict) -> list[str]:
    if "failed" in r:
        return [f"{name}: FAILED after {r['seconds']:.0f} s: {r['failed']}"]
    start = f" (of which starting Ray {r['ray_start']:.1f} s)" if r["ray_start"] else ""
    lines = [f"{name}: {r['seconds']:.1f} s{start}, peak memory PSS {r['peak_pss_mib']:.0f} MiB "
             f"(RSS {r['peak_mib']:.0f} MiB), {r['outputs']} outputs"]
    for length, c in r.get("per_length", {}).items():
        lines.append(f"  objects {length} px across the seam: {c['objects']}: {c['exactly_one']} exactly once, "
                     f"{c['split_or_duplicated']} split or duplicated, {c['missed']} missed")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sahi-python", default="/tmp/sahi-venv/bin/python")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048], help="scene sides for the speed part")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[5000, 20000],
                        help="scene sides for the memory part (cheap 'model', so the scene's size shows)")
    parser.add_argument("--workdir", default="/tmp/aerial-bench")
    parser.add_argument("--tool"), parser.add_argument("--part"), parser.add_argument("--scene")
    parser.add_argument("--model"), parser.add_argument("--checkpoint"), parser.add_argument("--truth")
    parser.add_argument("--workers", type=int, default=1), parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.tool:
        return child(args)

    import torch

    from model.builder import build_model
    from model.checkpoint import save_checkpoint
    from model.config import load_config
    from tests.benchmarks.common import generate_scene, publish

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = load_config(overrides={"classes": ["object"]})
    model = build_model(config).eval()
    checkpoint = work / "swin_t_sahi.pt"
    save_checkpoint(checkpoint, model, config, ["object"])
    torch.save(model, work / "swin_t_module.pt")  # SAHI gets the very same module
    seams = work / "seams.tif"
    (work / "seams.json").write_text(json.dumps(seam_scene(seams, args.sizes[0])))
    parts = [(f"speed {size}^2", generate_scene(work / f"scene_{size}.tif", size)) for size in args.sizes]
    parts += [(f"memory {size}^2", generate_scene(work / f"scene_{size}.tif", size)) for size in args.memory_sizes]
    parts.append((f"seams {args.sizes[0]}^2", seams))
    runs = [("ours 1 worker x 2 threads", "ours", 1, 2), ("ours 2 workers x 1 thread", "ours", 2, 1),
            ("SAHI (1 process, 2 threads)", "sahi", 1, 2)]

    lines = [f"tile {TILE}, overlap {OVERLAP}, score threshold {SCORE}, batch 2 (ours) / 1 (SAHI), 2 CPU cores; "
             "Swin-T Mask R-CNN with random weights for speed, a bright-region 'model' for memory and seams; memory: "
             "peak of the summed PSS (RSS) of each tool's processes (ours: driver, Ray daemons, workers)"]
    for part, scene_path in parts:
        results = {}
        for name, tool, workers, threads in runs:
            if not part.startswith("speed") and workers > 1:
                continue  # seams do not depend on the number of workers, and memory is shown with one
            python = sys.executable if tool == "ours" else args.sahi_python
            cmd = [python, __file__, "--tool", tool, "--part", part.split()[0], "--scene", str(scene_path),
                   "--model", str(work / "swin_t_module.pt"), "--checkpoint", str(checkpoint),
                   "--truth", str(work / "seams.json"), "--workdir", str(work), "--workers", str(workers),
                   "--threads", str(threads)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:  # a tool that crashes is a result too: report it, keep the other figures
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results[name] = {"failed": error, "seconds": time.perf_counter() - t}
            else:
                results[name] = json.loads(line[7:])
            lines += describe(f"{part} {name}", results[name])
            print(lines[-1], flush=True)
        sahi = results[runs[-1][0]]
        for name, r in results.items():
            if not part.startswith("seams") and name != runs[-1][0] and "failed" not in r and "failed" not in sahi:
                lines.append(f"{part}: SAHI / {name}: wall time {sahi['seconds'] / r['seconds']:.2f}, "
                             f"peak memory PSS {sahi['peak_pss_mib'] / r['peak_pss_mib']:.2f}")
    publish("Against SAHI", "python -m tests.benchmarks.bench_sahi " + " ".join(sys.argv[1:]), lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
