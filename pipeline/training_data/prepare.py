"""The `prepare` spine: scenes + labels -> COCO tiles (DIR/train, DIR/val) for training and evaluation.

Tiles are the same windows `run` uses (full size, edge windows shifted inward) and the same band mapping and
scaling, written as 8-bit RGB PNGs. Each COCO image record also carries its scene, window, CRS and affine so
any prediction on it can be mapped back to the map.

The work is cut into parts of at most `PART_WINDOWS` consecutive windows of one scene. The driver plans every part
(so bad input fails before any tile is written), then cuts them here in one process or as Ray tasks; each
finished part leaves its PNGs and a small JSON in the staging directory, keyed by a fingerprint of what
decides its result, so a rerun after an interruption redoes only the unfinished parts. The COCO files are
assembled at the end in scene then window order, so ids never depend on which task finished first.
"""

from __future__ import annotations


import hashlib
import json
import os
import shutil
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.windows
import shapely
from rasterio.errors import RasterioError
from shapely.geometry import box
from tqdm import tqdm

from core.errors import Interrupted, UserError, first_line
from core.files import atomic_path, check_not_input, exclusive, lock_path
from pipeline.training_data.coco import annotation_body
from pipeline.training_data.labels import read_labels, to_scene_crs
from pipeline.raster import (Scaling, SceneInfo, band_nodata, compute_scaling, is_virtual, normalize,
                             open_scene, read_window, resolve_bands, to_uint8, write_png)
from pipeline.scenes import expand_scenes, fingerprint, scene_identity
from pipeline.training_data.split import spatial_split
from pipeline.rect import Rect
from pipeline.windows import plan_windows
from pipeline.settings import PrepareSettings, Settings

SPLITS = ("train", "val")
# Most windows per task. Small parts balance a few big scenes over many workers and let a failed or
# interrupted run lose little; a size never derived from --workers keeps the resume keys stable.
PART_WINDOWS = 16
PART_FORMAT = 1  # version of the saved part files: bump when what a part saves changes
EXECUTION_KEYS = ("workers", "ray_address")  # how the cutting runs, never what it produces

WindowBox = tuple[int, int, int, int]  # col, row, width, height (as COCO records hold a window)


@dataclass(frozen=True)
class Part:
    """One task's work: consecutive windows of one scene and the labels that touch them, as plain data."""

    scene: str  # as given: names the tiles, fills their records, and messages
    path: str  # what the task opens: absolute (tasks may run in another directory or on another node)
    scene_index: int
    info: SceneInfo
    bands: list[int]
    nodata: tuple[float, ...] | None  # per band read (raster.band_nodata)
    first_window: int  # index of windows[0] in the scene's plan
    windows: list[WindowBox]
    sides: list[str]  # "train" | "val" | "drop", per window
    labels: list[bytes]  # WKB in the scene's CRS
    classes: list[str]  # class name of each label
    min_area_px: float
    min_part_px: int
    empty_fraction: float
    seed: int
    key: str  # fingerprint: the name of the part's saved result


def staging_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"{out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"{out}: parent directory {parent} is not writable")


def prepare(scenes: list[str], labels: str, out_dir: str | Path, settings: Settings,
            overwrite: bool = False, progress: bool = True, config: str | Path | None = None) -> dict[str, Any]:
    """Cut `scenes` (paths, globs or manifests) and `labels` into COCO tiles under out_dir/{train,val};
    returns (and saves) a summary. Runs in this process or on Ray (`prepare.workers`, `prepare.ray_address`)
    with the same result either way. `config`: the settings file they came from, never to be overwritten."""
    out = Path(out_dir)
    check_out_dir(out, overwrite)
    scenes = expand_scenes([str(s) for s in scenes])
    for path, role in ((out, "output directory"), (staging_dir(out), "work directory"), (lock_path(out), "lock file")):
        check_not_input(path, [*scenes, labels, config], role)
    with exclusive(out):  # one prepare per output directory at a time
        return prepare_locked(scenes, labels, out, settings, progress)


def prepare_locked(scenes: list[str], labels: str, out: Path, settings: Settings,
                   progress: bool) -> dict[str, Any]:
    p = settings.prepare
    frame, label_stats = read_labels(labels, p.class_field, p.class_name)
    categories = sorted(set(frame["class_name"]))
    parts = [part for index, scene in enumerate(scenes) for part in plan_scene(scene, index, frame, settings)]
    if not any(part.labels for part in parts):
        raise UserError(f"{labels}: no label intersects any of the scenes (check the CRS and the extent)")

    staging = staging_dir(out)
    todo = reusable_staging(staging, parts)
    if len(todo) < len(parts):
        print(f"resuming: {len(parts) - len(todo)} of {len(parts)} parts already cut in {staging}")
    cut_parts(todo, parts, staging, settings, progress)

    coco, counts, objects = assemble([load_part(staging, part) for part in parts], categories)
    summary = {
        "scenes": scenes, "labels": str(labels), "categories": categories,
        "tiles": {split: len(coco[split]["images"]) for split in SPLITS},
        "objects": {split: dict(objects[split]) for split in SPLITS},
        "skipped_nodata_tiles": counts["skipped_nodata"], "dropped_empty_tiles": counts["dropped_empty"],
        "dropped_split_border_tiles": counts["dropped_split_border"],
        "dropped_small_objects": counts["dropped_small"], "labels_read": label_stats,
        "settings": output_settings(settings),
    }
    publish(staging, out, coco, summary)
    print_summary(summary, out)
    return summary


def output_settings(settings: Settings) -> dict[str, Any]:
    """The settings without the execution options: what summary.json records and resume keys depend on."""
    kept = settings.to_dict()
    for key in EXECUTION_KEYS:
        kept["prepare"].pop(key, None)
    return kept


def plan_scene(scene: str, scene_index: int, frame: gpd.GeoDataFrame, settings: Settings) -> list[Part]:
    """A scene's parts. Opens the scene and checks its bands here, in the driver, before any task starts."""
    p = settings.prepare
    info = open_scene(scene)
    bands = resolve_bands(settings.bands, info.count, scene, info.alpha)
    nodata = band_nodata(settings.nodata, info, bands, scene)
    inside = labels_inside(frame, info)
    if len(inside) == 0:
        print(f"warning: {scene}: no label falls inside this scene")
    windows = plan_windows(info.width, info.height, settings.tile, settings.overlap)
    block_px = p.block_tiles * (settings.tile - settings.overlap)
    sides = spatial_split(windows, block_px, float(p.val_fraction), p.seed)
    identity = scene_identity(scene)
    path = scene if is_virtual(scene) else os.path.abspath(scene)
    key_settings = {k: v for k, v in output_settings(settings).items() if k not in ("run", "merge")}
    parts = []
    for first, stop in part_spans(len(windows)):
        chunk = windows[first:stop]
        boxes = [(w.col0, w.row0, w.width, w.height) for w in chunk]
        part_sides = sides[first:stop]
        geoms, classes = labels_over(inside, chunk, info)
        wkb = [bytes(g) for g in shapely.to_wkb(geoms)] if geoms else []
        key = fingerprint({"format": PART_FORMAT, "scene": identity, "scene_index": scene_index,
                           "settings": key_settings, "windows": boxes, "sides": part_sides,
                           "labels": labels_digest(wkb, classes)})
        parts.append(Part(scene=scene, path=path, scene_index=scene_index, info=info, bands=bands, nodata=nodata,
                          first_window=first, windows=boxes, sides=part_sides, labels=wkb, classes=classes,
                          min_area_px=float(p.min_area_px), min_part_px=settings.min_part_px,
                          empty_fraction=float(p.empty_fraction), seed=p.seed, key=key))
    return parts


def part_spans(n_windows: int) -> list[tuple[int, int]]:
    """[start, stop) of each part of a scene's windows: as few parts as PART_WINDOWS allows, of equal sizes
    (25 windows -> 13 + 12, not 16 + 9), so the last task of a scene is not the one that finishes late."""
    n_parts = max(1, -(-n_windows // PART_WINDOWS))
    edges = [round(i * n_windows / n_parts) for i in range(n_parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def labels_inside(frame: gpd.GeoDataFrame, info: SceneInfo) -> gpd.GeoDataFrame:
    """The labels that touch the scene, in the scene's CRS."""
    scene_labels = to_scene_crs(frame, info.crs)
    left, bottom, right, top = rasterio.transform.array_bounds(info.height, info.width, info.transform)
    return scene_labels[scene_labels.intersects(box(left, bottom, right, top))].reset_index(drop=True)


def window_box(window: Rect, info: SceneInfo) -> Any:
    return box(*rasterio.windows.bounds(window.to_window(), info.transform))


def labels_over(inside: gpd.GeoDataFrame, windows: list[Rect], info: SceneInfo) -> tuple[list[Any], list[str]]:
    """The labels touching any of `windows` (a task gets these, not the whole file), in label-file order."""
    rows = np.unique(np.concatenate([inside.sindex.query(window_box(w, info), predicate="intersects")
                                     for w in windows]))
    return list(inside.geometry.iloc[rows]), [str(c) for c in inside["class_name"].iloc[rows]]


def labels_digest(wkb: list[bytes], classes: list[str]) -> str:
    """A part's labels by content: editing labels elsewhere leaves the part's saved result valid."""
    h = hashlib.sha256()
    for geom, name in zip(wkb, classes):
        h.update(len(geom).to_bytes(8, "little") + geom + name.encode() + b"\0")
    return h.hexdigest()


def reusable_staging(staging: Path, parts: list[Part]) -> list[Part]:
    """Prepare the staging directory for this run, keeping the parts an earlier run of the same job finished;
    returns the parts still to cut. Saved parts of other settings or inputs are deleted, so their tiles can
    never pass for this run's (their PNGs are removed at the end unless this run writes them again)."""
    for split in SPLITS:
        (staging / split / "images").mkdir(parents=True, exist_ok=True)
    saved = staging / "parts"
    saved.mkdir(exist_ok=True)
    keys = {part.key for part in parts}
    for path in saved.iterdir():
        if path.stem not in keys or path.suffix != ".json":
            path.unlink()
    return [part for part in parts if not part_path(staging, part).exists()]


def part_path(staging: Path, part: Part) -> Path:
    return staging / "parts" / f"{part.key}.json"


def cut_parts(todo: list[Part], parts: list[Part], staging: Path, settings: Settings, progress: bool) -> None:
    """Cut `todo` here or on Ray, with a progress bar over all windows; Ctrl-C raises `Interrupted`."""
    p = settings.prepare
    total = sum(len(part.windows) for part in parts)
    scenes_left = Counter(part.scene_index for part in todo)
    n_scenes = len({part.scene_index for part in parts})
    bar = tqdm(total=total, initial=total - sum(len(part.windows) for part in todo), desc="prepare", unit="tile",
               disable=not progress)
    bar.set_postfix(scenes=f"{n_scenes - len(scenes_left)}/{n_scenes}")

    def done(part: Part) -> None:
        scenes_left[part.scene_index] -= 1
        if scenes_left[part.scene_index] == 0:
            del scenes_left[part.scene_index]
        bar.update(len(part.windows))
        bar.set_postfix(scenes=f"{n_scenes - len(scenes_left)}/{n_scenes}")

    try:
        if todo and use_ray(p):
            cut_on_ray(todo, staging, settings, p.workers, p.ray_address, done)
        else:
            cut_here(todo, staging, settings, done)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted: {bar.n} of {total} windows cut and saved in {staging}; run the same "
                          "command to resume") from None
    finally:
        bar.close()


def use_ray(p: PrepareSettings) -> bool:
    """Ray only when asked, whatever the number of scenes: --workers N > 1, --ray-address, or $RAY_ADDRESS
    (set for a `ray job submit` entrypoint: a job sent to a cluster is meant to use it). Starting Ray
    in-process costs ~6 s on 2 cores, more than it saves on jobs under ~15 s (docs/benchmarks.md)."""
    return bool(p.ray_address or os.environ.get("RAY_ADDRESS")) or (p.workers or 1) > 1


def cut_here(todo: list[Part], staging: Path, settings: Settings, done: Callable[[Part], None]) -> None:
    """Cut the parts one after another in this process."""
    scalings: dict[int, Scaling] = {}
    for part in todo:
        if part.scene_index not in scalings:
            scalings[part.scene_index] = compute_scaling(part.path, part.info, settings, part.bands)
        run_part(part, scalings[part.scene_index], str(staging))
        done(part)


def cut_on_ray(todo: list[Part], staging: Path, settings: Settings, workers: int | None,
               address: str | None, done: Callable[[Part], None]) -> None:
    """Cut the parts as Ray tasks, at most `workers` at a time (default: every CPU of the cluster).

    Each scene's value scaling is measured once, in a task its parts wait on. A failed part stops new
    submissions; the running ones finish (their work is saved for the rerun) and the failure is raised
    naming its scene. On Ctrl-C the running tasks are cancelled.
    """
    import ray

    from core.cluster import in_flight, ray_session

    with ray_session(address):
        limit = int(workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
        cut = ray.remote(num_cpus=1)(run_part)
        measure = ray.remote(num_cpus=1)(compute_scaling)
        scalings: dict[int, Any] = {}
        queue = deque(todo)
        failure: Exception | None = None

        def next_part() -> Part | None:  # none after a failure: the running parts finish, saved for the rerun
            return queue.popleft() if queue and failure is None else None

        def start(part: Part) -> Any:
            if part.scene_index not in scalings:
                scalings[part.scene_index] = measure.remote(part.path, part.info, settings, part.bands)
            return cut.remote(part, scalings[part.scene_index], os.path.abspath(staging))

        for part, ref in in_flight(next_part, start, lambda running: running < limit):
            try:
                ray.get(ref)
            except ray.exceptions.RayError as exc:
                failure = failure or part_failure(part, exc)
                continue
            done(part)
    if failure is not None:
        raise failure


def part_failure(part: Part, exc: Exception) -> Exception:
    """A failed task as one line naming its scene (a UserError from the task already does)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, UserError):
        return cause
    detail = f"{type(cause).__name__}: {first_line(cause)}" if cause is not None else first_line(exc)
    return RuntimeError(f"{part.scene}: cutting windows {part.first_window}-"
                        f"{part.first_window + len(part.windows) - 1} failed ({detail})")


def run_part(part: Part, scaling: Scaling, staging: str) -> int:
    """Cut a part and save its result beside its tiles; the part file appears (atomically) only once every
    PNG is written, so its presence means the part is complete. Returns the number of windows handled."""
    result = cut_part(part, scaling, Path(staging))
    with atomic_path(part_path(Path(staging), part)) as tmp:
        tmp.write_text(json.dumps({"key": part.key, "scene": part.scene, **result}))
    return len(part.windows)


def cut_part(part: Part, scaling: Scaling, staging: Path) -> dict[str, Any]:
    """The tile cutting itself, for both the one-process loop and the Ray task: the part's PNGs go to
    staging/{train,val}/images; returns plain data: `tiles` (split, COCO image record without id, and the
    (class name, annotation body) of each object) in window order, and `counts` of what was skipped."""
    geoms = shapely.from_wkb(part.labels) if part.labels else np.zeros(0, dtype=object)
    tree = shapely.STRtree(geoms)
    counts: Counter[str] = Counter()
    tiles = []
    for offset, ((col, row, w, h), side) in enumerate(zip(part.windows, part.sides)):
        if side == "drop":
            counts["dropped_split_border"] += 1
            continue
        window = Rect(col, row, col + w, row + h)
        try:
            raw, valid = read_window(part.path, window, part.bands, part.nodata, part.info.masked)
        except RasterioError as exc:  # GDAL's own message (the failed block) is in the chained error
            raise UserError(f"{part.scene}: cannot read the window at column {col}, row {row} "
                            f"({first_line(exc.__cause__ or exc)})") from None
        if not valid.any():
            counts["skipped_nodata"] += 1
            continue
        w_transform = rasterio.windows.transform(window.to_window(), part.info.transform)
        objects = []
        for i in np.sort(tree.query(window_box(window, part.info), predicate="intersects")):
            body = annotation_body(geoms[i], w_transform, h, w, part.min_area_px, part.min_part_px)
            if body is None:
                counts["dropped_small"] += 1
                continue
            objects.append((part.classes[i], body))
        if not objects and not keep_empty(part, part.first_window + offset):
            counts["dropped_empty"] += 1
            continue
        name = f"{Path(part.scene).stem}_{part.scene_index}_r{row}_c{col}.png"
        write_png(staging / side / "images" / name, to_uint8(normalize(raw, scaling), valid))
        record = {"file_name": name, "width": w, "height": h, "scene": str(part.scene), "window": [col, row, w, h],
                  "crs": part.info.crs, "transform": list(w_transform)[:6]}
        tiles.append({"split": side, "image": record, "objects": objects})
    return {"tiles": tiles, "counts": dict(counts)}


def keep_empty(part: Part, window_index: int) -> bool:
    """Whether a label-free tile is kept as a negative: a draw of its own from (seed, scene, window), so the
    choice never depends on which other tiles were cut before it, or where."""
    rng = np.random.default_rng([part.seed, part.scene_index, window_index])
    return bool(rng.random() < part.empty_fraction)


def load_part(staging: Path, part: Part) -> dict[str, Any]:
    return json.loads(part_path(staging, part).read_text())


def assemble(results: list[dict[str, Any]], categories: list[str]) -> tuple[dict, Counter, dict[str, Counter]]:
    """The COCO dicts of both splits from the parts' results in scene then window order (ids 1.. in that
    order), the summed counts and the objects per split and class."""
    category_id = {name: i + 1 for i, name in enumerate(categories)}
    coco = {split: {"images": [], "annotations": [],
                    "categories": [{"id": i, "name": n} for n, i in category_id.items()]} for split in SPLITS}
    counts: Counter[str] = Counter()
    objects = {split: Counter() for split in SPLITS}
    for result in results:
        counts.update(result["counts"])
        for tile in result["tiles"]:
            split = coco[tile["split"]]
            image_id = len(split["images"]) + 1
            split["images"].append({"id": image_id, **tile["image"]})
            for class_name, body in tile["objects"]:
                split["annotations"].append({"id": len(split["annotations"]) + 1, "image_id": image_id,
                                             "category_id": category_id[class_name], **body})
                objects[tile["split"]][class_name] += 1
    return coco, counts, objects


def publish(staging: Path, out: Path, coco: dict[str, Any], summary: dict[str, Any]) -> None:
    """Write the COCO files, drop what is not this run's (saved parts, stray tiles of parts cut under other
    settings) and rename the staging directory into place: the whole output appears at once."""
    for split in SPLITS:
        (staging / split / "annotations.json").write_text(json.dumps(coco[split]))
        names = {image["file_name"] for image in coco[split]["images"]}
        for path in (staging / split / "images").iterdir():
            if path.name not in names:
                path.unlink()
    (staging / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    shutil.rmtree(staging / "parts")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def print_summary(summary: dict[str, Any], out: Path) -> None:
    print(f"{out}: {summary['tiles']['train']} train / {summary['tiles']['val']} val tiles")
    for split in SPLITS:
        per_class = ", ".join(f"{k} {v}" for k, v in sorted(summary["objects"][split].items())) or "none"
        print(f"  {split} objects: {per_class}")
    ls = summary["labels_read"]
    print(f"  skipped: {summary['skipped_nodata_tiles']} all-nodata tiles, {summary['dropped_empty_tiles']} "
          f"label-free tiles, {summary['dropped_split_border_tiles']} train tiles overlapping validation, "
          f"{summary['dropped_small_objects']} objects under the minimum area")
    print(f"  labels: {ls['features']} read, {ls['repaired']} repaired, {ls['dropped_empty']} empty and "
          f"{ls['dropped_not_polygon']} non-polygon dropped")
