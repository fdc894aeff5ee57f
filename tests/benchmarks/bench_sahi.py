"""Against SAHI: the same torchvision model, scene, tile size and overlap.

1. Speed and memory: Swin-T Mask R-CNN (random weights) on a generated scene; wall time and peak resident
   memory of each tool (ours: driver + Ray workers; SAHI: its process, which holds the whole image).
2. Seams: a deterministic 'model' (bright regions -> masks, wrapped as a torch module so SAHI runs it like
   any torchvision model) on a scene of bright squares laid across tile seams; counts objects that come out
   split (more than one output overlapping one true object) or duplicated.

SAHI is installed only in the benchmark environment:
    python -m venv --system-site-packages /tmp/sahi-venv && /tmp/sahi-venv/bin/pip install sahi
    python -m tests.benchmarks.bench_sahi --sahi-python /tmp/sahi-venv/bin/python [--sizes 2048 4096]
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
import torch
from affine import Affine

REPO = Path(__file__).resolve().parents[2]
TILE, OVERLAP = 512, 64


class BrightRegions(torch.nn.Module):
    """Connected bright regions of channel 0 as Mask R-CNN eval outputs (score 0.9, label 1)."""

    def forward(self, images):
        from scipy import ndimage

        out = []
        for image in images:
            labels, n = ndimage.label((image[0] > 0.8).cpu().numpy())
            masks = torch.from_numpy(np.stack([labels == i for i in range(1, n + 1)]) if n else
                                     np.zeros((0, *labels.shape), dtype=bool))
            boxes = torch.tensor([[float(s[1].start), float(s[0].start), float(s[1].stop), float(s[0].stop)]
                                  for s in ndimage.find_objects(labels)], dtype=torch.float32).reshape(-1, 4)
            out.append({"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64), "scores": torch.full((n,), 0.9),
                        "masks": masks[:, None].float()})
        return out

    def __call__(self, images):  # also a run_scene predictor
        return super().__call__(images)


def seam_scene(path: Path, size: int) -> list[tuple[int, int, int, int]]:
    """Dark scene with 60 px bright squares centred on seams and corners; returns their boxes (r0, c0, r1, c1)."""
    image = np.full((3, size, size), 50, dtype=np.uint8)
    stride = TILE - OVERLAP
    boxes = []
    for r in range(stride + OVERLAP // 2, size - 60, stride):
        for c in range(stride // 2, size - 60, stride // 2):
            r0, c0 = r - 30, c - 30
            image[:, r0:r0 + 60, c0:c0 + 60] = 240
            boxes.append((r0, c0, r0 + 60, c0 + 60))
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000), tiled=True,
                       blockxsize=256, blockysize=256) as dst:
        dst.write(image)
    return boxes


def full_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A SAHI mask as a scene-sized boolean array (SAHI may return it cropped at the top left)."""
    full = np.zeros(shape, dtype=bool)
    full[:mask.shape[0], :mask.shape[1]] = mask[:shape[0], :shape[1]]
    return full


def count_outputs(masks: Iterable[np.ndarray], truth: list[tuple[int, int, int, int]]) -> dict:
    """Per true object, how many output masks touch it: 1 is right, >1 split or duplicated, 0 missed."""
    touching, outputs = [0] * len(truth), 0
    for mask in masks:
        outputs += 1
        for k, (r0, c0, r1, c1) in enumerate(truth):
            if mask[r0:r1, c0:c1].any():
                touching[k] += 1
    return {"objects": len(truth), "outputs": outputs, "exactly_one": sum(t == 1 for t in touching),
            "split_or_duplicated": sum(t > 1 for t in touching), "missed": sum(t == 0 for t in touching)}


def child(args: argparse.Namespace) -> None:
    """Run one tool in this (fresh) process and print a JSON line."""
    from tests.benchmarks.common import PeakMemory

    with PeakMemory() as mem:
        t = time.perf_counter()  # both clocks include loading the model, as a user's run does
        if args.tool == "ours":
            import ray

            from pipeline.run import run_scene

            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            started = time.perf_counter() - t
            out = Path(args.workdir) / f"ours_{args.part}.gpkg"
            kwargs = {"predictor": BrightRegions()} if args.part == "seams" else {"checkpoint": args.checkpoint}
            run_scene(args.scene, out, tile=TILE, overlap=OVERLAP, batch_size=2, scaling="divide255",
                      score_threshold=0.5, overwrite=True, progress=False, **kwargs)
            ray.shutdown()
            seconds = time.perf_counter() - t
            import geopandas as gpd

            outputs = gpd.read_file(out).geometry
        else:
            from sahi.models.torchvision import TorchVisionDetectionModel
            from sahi.predict import get_sliced_prediction

            torch.set_num_threads(2)
            model = BrightRegions() if args.part == "seams" else torch.load(args.model, weights_only=False)
            model.eval()
            with rasterio.open(args.scene) as src:
                image = np.moveaxis(src.read(), 0, -1)  # SAHI works on the whole image in memory
            wrapped = TorchVisionDetectionModel(model=model, confidence_threshold=0.5, device="cpu",
                                                category_mapping={"1": "object"}, load_at_init=True)
            result = get_sliced_prediction(image, wrapped, slice_height=TILE, slice_width=TILE,
                                           overlap_height_ratio=OVERLAP / TILE, overlap_width_ratio=OVERLAP / TILE,
                                           perform_standard_pred=False, verbose=0)
            seconds, started = time.perf_counter() - t, 0.0
            outputs = [p.mask for p in result.object_prediction_list if p.mask is not None]  # polygons
        peak = mem.peak  # the tool's own work only: counting below rasterizes outputs one at a time
    report = {"tool": args.tool, "part": args.part, "seconds": seconds, "ray_start": started, "peak_mib": peak / 2**20,
              "outputs": len(outputs)}
    if args.part == "seams":
        with rasterio.open(args.scene) as src:
            shape, transform = src.shape, src.transform
        report.update(count_outputs(
            (rasterio.features.rasterize([o], out_shape=shape, transform=transform).astype(bool)
             if args.tool == "ours" else full_mask(o.bool_mask, shape) for o in outputs),
            json.loads(Path(args.truth).read_text())))
    print("RESULT " + json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sahi-python", default="/tmp/sahi-venv/bin/python")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048], help="scene sides for the speed part")
    parser.add_argument("--workdir", default="/tmp/aerial-bench")
    parser.add_argument("--tool"), parser.add_argument("--part"), parser.add_argument("--scene")
    parser.add_argument("--model"), parser.add_argument("--checkpoint"), parser.add_argument("--truth")
    args = parser.parse_args()
    if args.tool:
        return child(args)

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
    parts.append((f"seams {args.sizes[0]}^2", seams))

    lines = [f"tile {TILE}, overlap {OVERLAP}, batch 2 (ours) / 1 (SAHI), 2 CPU threads; Swin-T Mask R-CNN with "
             "random weights for speed, a bright-region 'model' for seams"]
    results = {}
    for part, scene_path in parts:
        for tool, python in (("ours", sys.executable), ("sahi", args.sahi_python)):
            cmd = [python, __file__, "--tool", tool, "--part", part.split()[0], "--scene", str(scene_path),
                   "--model", str(work / "swin_t_module.pt"), "--checkpoint", str(checkpoint),
                   "--truth", str(work / "seams.json"), "--workdir", str(work)]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:  # a tool that crashes is a result too: report it, keep the other figures
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results[(tool, part)] = {"failed": error, "seconds": time.perf_counter() - t}
            else:
                results[(tool, part)] = json.loads(line[7:])
            print(tool, part, results[(tool, part)], flush=True)
    for part, _ in parts:
        for tool in ("ours", "sahi"):
            r = results[(tool, part)]
            if "failed" in r:
                lines.append(f"{part} {tool}: FAILED after {r['seconds']:.0f} s: {r['failed']}")
                continue
            extra = ""
            if part.startswith("seams"):
                extra = (f"; {r['objects']} true objects on seams: {r['exactly_one']} exactly once, "
                         f"{r['split_or_duplicated']} split or duplicated, {r['missed']} missed")
            start = f" (of which starting Ray {r['ray_start']:.1f} s)" if r["ray_start"] else ""
            lines.append(f"{part} {tool}: {r['seconds']:.1f} s{start}, peak RSS {r['peak_mib']:.0f} MiB, "
                         f"{r['outputs']} outputs{extra}")
        s_ours, s_sahi = results[("ours", part)], results[("sahi", part)]
        if part.startswith("speed") and "failed" not in s_ours and "failed" not in s_sahi:
            lines.append(f"{part}: SAHI / ours wall time {s_sahi['seconds'] / s_ours['seconds']:.2f}, "
                         f"peak memory {s_sahi['peak_mib'] / s_ours['peak_mib']:.2f}")
    publish("Against SAHI", "python -m tests.benchmarks.bench_sahi " + " ".join(sys.argv[1:]), lines)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
