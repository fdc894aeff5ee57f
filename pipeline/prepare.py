"""The `prepare` spine: scenes + labels -> COCO tiles (DIR/train, DIR/val) for training and evaluation.

Tiles are the same windows `run` uses (full size, edge windows shifted inward) and the same band mapping and
scaling, written as 8-bit RGB PNGs. Each COCO image record also carries its scene, window, CRS and affine so
any prediction on it can be mapped back to the map.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.windows
from shapely.geometry import box
from tqdm import tqdm

from model.errors import UserError
from pipeline.coco import annotation_body
from pipeline.labels import read_labels, to_scene_crs
from pipeline.raster import compute_scaling, normalize, open_scene, read_window, resolve_bands, to_uint8, write_png
from pipeline.split import spatial_split
from pipeline.windows import plan_windows


def staging_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{out}: parent directory {parent} does not exist")


def prepare(scenes: list[str], labels: str, out_dir: str | Path, settings: dict[str, Any],
            overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Cut `scenes` and `labels` into COCO tiles under out_dir/{train,val}; returns (and saves) a summary."""
    p = settings["prepare"]
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    frame, label_stats = read_labels(labels, p["class_field"], p["class_name"])
    categories = sorted(set(frame["class_name"]))
    category_id = {name: i + 1 for i, name in enumerate(categories)}

    # Plan every scene first, so bad input fails before any tile is written.
    plans = []
    for scene in scenes:
        info = open_scene(scene)
        scene_labels = to_scene_crs(frame, info.crs)
        left, bottom, right, top = rasterio.transform.array_bounds(info.height, info.width, info.transform)
        inside = scene_labels[scene_labels.intersects(box(left, bottom, right, top))].reset_index(drop=True)
        if len(inside) == 0:
            print(f"warning: {scene}: no label falls inside this scene")
        windows = plan_windows(info.width, info.height, settings["tile"], settings["overlap"])
        block_px = int(p["block_tiles"]) * (settings["tile"] - settings["overlap"])
        sides = spatial_split(windows, block_px, float(p["val_fraction"]), int(p["seed"]))
        plans.append((scene, info, inside, windows, sides))
    if not any(len(plan[2]) for plan in plans):
        raise UserError(f"{labels}: no label intersects any of the scenes (check the CRS and the extent)")

    staging = staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)  # a previous interrupted run: start over cleanly
    coco = {split: {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in
                                                                      category_id.items()]} for split in ("train", "val")}
    for split in coco:
        (staging / split / "images").mkdir(parents=True)
    counts = Counter()
    objects = {split: Counter() for split in coco}
    rng = np.random.default_rng(int(p["seed"]))
    total = sum(len(plan[3]) for plan in plans)
    bar = tqdm(total=total, desc="prepare", unit="tile", disable=not progress)
    for scene_index, (scene, info, inside, windows, sides) in enumerate(plans):
        bands = resolve_bands(settings["bands"], info.count, scene, info.alpha)
        scaling = compute_scaling(scene, info, settings, bands)
        nodata = settings["nodata"] if settings["nodata"] is not None else info.nodata
        index = inside.sindex
        for window, side in zip(windows, sides):
            bar.update(1)
            if side == "drop":
                counts["dropped_split_border"] += 1
                continue
            raw, valid = read_window(scene, window, bands, nodata, info.masked)
            if not valid.any():
                counts["skipped_nodata"] += 1
                continue
            w_transform = rasterio.windows.transform(window, info.transform)
            h, w = int(window.height), int(window.width)
            left, bottom, right, top = rasterio.windows.bounds(window, info.transform)
            anns = []
            for i in index.query(box(left, bottom, right, top), predicate="intersects"):
                body = annotation_body(inside.geometry.iloc[i], w_transform, h, w, float(p["min_area_px"]))
                if body is None:
                    counts["dropped_small"] += 1
                    continue
                anns.append((inside["class_name"].iloc[i], body))
            if not anns and rng.random() >= float(p["empty_fraction"]):
                counts["dropped_empty"] += 1
                continue
            split = coco[side]
            image_id = len(split["images"]) + 1
            name = f"{Path(scene).stem}_{scene_index}_r{int(window.row_off)}_c{int(window.col_off)}.png"
            write_png(staging / side / "images" / name, to_uint8(normalize(raw, scaling), valid))
            split["images"].append({
                "id": image_id, "file_name": name, "width": w, "height": h, "scene": str(scene),
                "window": [int(window.col_off), int(window.row_off), w, h], "crs": info.crs,
                "transform": list(w_transform)[:6],
            })
            for class_name, body in anns:
                split["annotations"].append({"id": len(split["annotations"]) + 1, "image_id": image_id,
                                             "category_id": category_id[class_name], **body})
                objects[side][class_name] += 1
    bar.close()

    summary = {
        "scenes": [str(s) for s in scenes], "labels": str(labels), "categories": categories,
        "tiles": {split: len(coco[split]["images"]) for split in coco},
        "objects": {split: dict(objects[split]) for split in coco},
        "skipped_nodata_tiles": counts["skipped_nodata"], "dropped_empty_tiles": counts["dropped_empty"],
        "dropped_split_border_tiles": counts["dropped_split_border"],
        "dropped_small_objects": counts["dropped_small"], "labels_read": label_stats,
        "settings": settings,
    }
    for split in coco:
        (staging / split / "annotations.json").write_text(json.dumps(coco[split]))
    (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)  # the whole directory appears at once
    print_summary(summary, out)
    return summary


def print_summary(summary: dict[str, Any], out: Path) -> None:
    print(f"{out}: {summary['tiles']['train']} train / {summary['tiles']['val']} val tiles")
    for split in ("train", "val"):
        per_class = ", ".join(f"{k} {v}" for k, v in sorted(summary["objects"][split].items())) or "none"
        print(f"  {split} objects: {per_class}")
    ls = summary["labels_read"]
    print(f"  skipped: {summary['skipped_nodata_tiles']} all-nodata tiles, {summary['dropped_empty_tiles']} "
          f"label-free tiles, {summary['dropped_split_border_tiles']} train tiles overlapping validation, "
          f"{summary['dropped_small_objects']} objects under the minimum area")
    print(f"  labels: {ls['features']} read, {ls['repaired']} repaired, {ls['dropped_empty']} empty and "
          f"{ls['dropped_not_polygon']} non-polygon dropped")
