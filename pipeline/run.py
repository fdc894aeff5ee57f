"""The `run` spine: plan -> read + predict (Ray) -> merge -> polygonize -> write. Each stage is its own module."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pickle
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rasterio.windows import Window
from tqdm import tqdm

from model.errors import UserError
from model.files import atomic_path, check_writable
from pipeline.execute import RayPool, ReadSpec, TileResult
from pipeline.geopackage import GeoPackageWriter, read_run_metadata
from pipeline.merge import merge_instances, settle_window
from pipeline.polygonize import mask_to_geometry
from pipeline.predict import CheckpointPredictor
from pipeline.quicklook import Quicklook
from pipeline.instances import Instance
from pipeline.raster import (SceneInfo, band_nodata, compute_scaling, first_look, is_virtual, open_scene,
                             resolve_bands)
from pipeline.scenes import fingerprint, scene_identity, scene_name
from pipeline.settings import load_settings, settings_overrides
from pipeline.store import TileStore, state_dir
from pipeline.style import label_name
from pipeline.windows import plan_windows, private_regions

WRITE_BATCH = 5000  # polygons per GeoPackage append: bounded memory for millions of instances


class Interrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a run; finished tiles are saved and a rerun resumes from them."""

    def __init__(self, saved: int, total: int, state: Path):
        super().__init__(f"interrupted: {saved} of {total} tiles saved in {state}; run the same command to resume")
        self.saved, self.total, self.state = saved, total, state


@dataclass
class RunSummary:
    scene: str
    output: str
    tiles: int = 0
    tiles_nodata: int = 0
    tiles_resumed: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"window": [col, row, w, h], "error": ...}
    raw_instances: int = 0
    merged_instances: int = 0
    resubmitted_tiles: int = 0
    worker_restarts: int = 0
    stale_state_cleared: bool = False
    layer: str = ""
    up_to_date: bool = False  # the output already held this result (same scene, model and options): skipped
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        s = self.seconds
        if self.up_to_date:
            return [f"{self.scene} -> {self.output} (layer {self.layer}): up to date, skipped (same scene, model "
                    "and options; --overwrite to redo)"]
        out = [
            f"{self.scene} -> {self.output} (layer {self.layer})",
            f"  tiles: {self.tiles} ({self.tiles_nodata} all-nodata skipped, {self.tiles_resumed} resumed from "
            f"a previous run, {self.resubmitted_tiles} re-submitted after a lost worker, "
            f"{self.worker_restarts} lost workers replaced)",
            f"  instances: {self.raw_instances} from tiles -> {self.merged_instances} after the seam merge",
            "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s.items()),
        ]
        out += [f"  warning: {w}" for w in self.warnings]
        if self.failed:
            out.append(f"  INCOMPLETE: {len(self.failed)} tiles failed after retries (col, row, width, height):")
            out += [f"    window {f['window']}: {f['error']}" for f in self.failed[:20]]
        return out


def predictor_identity(predictor: Callable) -> dict[str, Any]:
    """What makes a predictor's results reproducible, for the resume fingerprint."""
    if isinstance(predictor, CheckpointPredictor):
        stat = os.stat(predictor.checkpoint)
        return {"checkpoint": os.path.abspath(predictor.checkpoint), "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns, "device": predictor.device}
    try:
        blob = pickle.dumps(predictor)
    except Exception:  # not picklable here; Ray will say so with its own message
        blob = repr(type(predictor)).encode()
    return {"predictor": f"{type(predictor).__module__}.{type(predictor).__qualname__}",
            "pickle_sha256": hashlib.sha256(blob).hexdigest()}


def class_names_of(predictor: Callable) -> list[str] | None:
    names = getattr(predictor, "class_names", None)
    return list(names) if names else None


def run_scene(
    scene: str,
    output: str | Path,
    predictor: Callable | None = None,
    *,
    checkpoint: str | None = None,
    config: str | Path | None = None,
    progress: bool = True,
    pool: RayPool | None = None,
    layer: str | None = None,
    keep_other_layers: bool = False,
    sidecar_base: Path | None = None,
    **options: Any,
) -> RunSummary:
    """Run the whole pipeline on one scene and write a GeoPackage to `output`.

    `predictor`: any picklable callable taking a list of float32 C x H x W tensors in [0, 1] and returning
    torchvision Mask R-CNN eval outputs; default: the model in `checkpoint`. `options`: any key of
    configs/pipeline.yaml (flat names, e.g. tile=256, batch_size=4, iou_threshold=0.6). `pool`: reuse
    running Ray actors across scenes (the CLI does); by default Ray is started and stopped here.
    `layer`: the layer name (default: the `layer` setting, else named after the scene). `keep_other_layers`:
    add the layer to the GeoPackage at `output` instead of replacing the file (scenes collected in one file;
    a layer already holding this very result is kept and the scene skipped). `sidecar_base`: where the
    quicklook and report go (default: beside `output`, named after it).

    An existing output made from the same scene, model and options is left as it is (`up_to_date`), so a
    rerun of a many-scene job after an interruption goes straight to the scenes that are not done; one
    that is incomplete (failed windows) is redone, anything else needs `overwrite`.
    """
    settings = load_settings(config, settings_overrides(options))
    r = settings["run"]
    if predictor is None:
        checkpoint = checkpoint or r["checkpoint"]
        if not checkpoint:
            raise UserError("no model: give --checkpoint model.pt (train one with `python -m pipeline train`) "
                            "or pass a predictor")
        predictor = CheckpointPredictor(checkpoint, r["device"], r["score_threshold"])
    if isinstance(predictor, CheckpointPredictor) and predictor.score_threshold > r["score_threshold"]:
        raise UserError(f"the predictor skips detections under {predictor.score_threshold} but this run keeps "
                        f"those from {r['score_threshold']}: build it with score_threshold <= the run's")
    output = Path(output)
    layer = layer or r["layer"] or scene_name(scene)
    summary = RunSummary(scene=str(scene), output=str(output), layer=layer)

    t = time.perf_counter()
    info = open_scene(scene)
    check_output(output)
    spec = read_spec(scene, info, settings)
    windows = plan_windows(info.width, info.height, settings["tile"], settings["overlap"])
    summary.tiles = len(windows)
    key = fingerprint({"scene": scene_identity(scene), "predictor": predictor_identity(predictor),
                       "read": spec, "tile": settings["tile"], "overlap": settings["overlap"]})
    result_key = fingerprint({"tiles": key, "merge": settings["merge"], "simplify": r["simplify"]})
    if reusable_output(output, layer, result_key, bool(r["overwrite"]), keep_other_layers):
        summary.up_to_date = True
        return summary
    store = TileStore(state_dir(output, layer if keep_other_layers else None), key)
    summary.stale_state_cleared = store.stale
    overview, notes = first_look(scene, info, spec.bands, spec.nodata)  # collar check; the quicklook reuses it
    summary.warnings += notes
    summary.seconds["plan"] = time.perf_counter() - t

    t = time.perf_counter()
    settled = Settled(private_regions(windows), settings, info)
    predict_tiles(spec, windows, store, predictor, settings, pool, summary, progress, settled.take)
    summary.seconds["read+predict"] = time.perf_counter() - t - settled.seconds
    summary.seconds["settle tiles"] = settled.seconds
    summary.raw_instances = settled.raw

    t = time.perf_counter()
    merged = merge_instances(settled.pending(), settled.iou, settled.ios)
    summary.merged_instances = settled.final + len(merged)
    summary.seconds["merge"] = time.perf_counter() - t

    t = time.perf_counter()
    early = (f for i in sorted(settled.features) for f in settled.features[i])
    late = (f for m in merged for f in settled.polygons([m]))  # polygonized batch by batch as they are written
    metadata = {**run_metadata(predictor, settings, summary), "result_fingerprint": result_key}
    names = class_names_of(predictor)
    quicklook = (Quicklook(scene, info, spec.bands, spec.scaling, class_names=names, overview=overview)
                 if settings["run"]["quicklook"] and overview is not None else None)
    with GeoPackageWriter(output, info.crs, layer=layer, metadata=metadata, overwrite=True, class_names=names,
                          keep_other_layers=keep_other_layers) as writer:
        write_features(itertools.chain(early, late), writer, names, quicklook)
    if quicklook is not None:
        quicklook.save(sidecar(sidecar_base or output, ".quicklook.png"))
    summary.seconds["polygonize+write"] = time.perf_counter() - t
    write_report(sidecar(sidecar_base or output, ".report.json"), summary, metadata)
    if summary.complete:
        store.remove()
    return summary


Feature = tuple[Any, int, float]  # (Polygon | MultiPolygon in the scene's CRS, class id, score)


class Settled:
    """Tiles settled as they arrive, so polygonizing hides behind the model instead of following it.

    Objects lying in their window's private region (`windows.private_regions`) are final at once and are
    polygonized right away; every other detection waits in `pending()` for the scene-wide seam merge, which
    then gives exactly what merging all detections at the end would give. Both are kept by window, so the
    output's rows come in the same order whatever order the tiles finish in (on a cluster or not).
    """

    def __init__(self, private: list[tuple[int, int, int, int]], settings: dict[str, Any], info: SceneInfo):
        self.private, self.info = private, info
        self.iou, self.ios = float(settings["merge"]["iou_threshold"]), float(settings["merge"]["ios_threshold"])
        self.simplify = float(settings["run"]["simplify"])
        self.features: dict[int, list[Feature]] = {}
        self.waiting: dict[int, list[Instance]] = {}
        self.raw = self.final = 0
        self.seconds = 0.0

    def take(self, result: TileResult) -> None:
        t = time.perf_counter()
        final, pending = settle_window(result.instances, self.private[result.index], self.iou, self.ios)
        self.features[result.index] = self.polygons(final)
        self.waiting[result.index] = pending
        self.raw += len(result.instances)
        self.final += len(final)
        self.seconds += time.perf_counter() - t

    def pending(self) -> list[Instance]:
        """Detections left for the scene-wide merge, in window order."""
        return [m for i in sorted(self.waiting) for m in self.waiting[i]]

    def polygons(self, instances: list[Instance]) -> list[Feature]:
        """Map polygons of final objects; one whose outline a repair reduced to nothing is left out."""
        features = [(mask_to_geometry(m.mask, m.row, m.col, self.info.transform, self.simplify), m.label, m.score)
                    for m in instances]
        return [f for f in features if not f[0].is_empty]


def read_spec(scene: str, info: SceneInfo, settings: dict[str, Any]) -> ReadSpec:
    """How workers turn this scene's windows into model input (bands, nodata, scaling, thresholds)."""
    r = settings["run"]
    bands = resolve_bands(settings["bands"], info.count, scene, info.alpha)
    # Workers on other nodes (or in another working directory) get an absolute path.
    return ReadSpec(scene=str(scene) if is_virtual(scene) else os.path.abspath(scene), bands=bands, masked=info.masked,
                    nodata=band_nodata(settings["nodata"], info, bands, scene),
                    scaling=compute_scaling(scene, info, settings, bands),
                    score_threshold=float(r["score_threshold"]), mask_threshold=float(r["mask_threshold"]))


def predict_tiles(spec: ReadSpec, windows: list[Window], store: TileStore, predictor: Callable,
                  settings: dict[str, Any], pool: RayPool | None, summary: RunSummary, progress: bool,
                  take: Callable[[TileResult], None]) -> None:
    """Hand every window's result to `take`: saved ones from an earlier run first, then the rest from the
    Ray pool, each saved as it arrives. Failed windows go into `summary.failed`; Ctrl-C raises `Interrupted`."""
    done: dict[int, str] = {}
    found = 0
    for res in store.saved():
        take(res)
        done[res.index] = res.status
        found += len(res.instances)
    summary.tiles_resumed = len(done)
    todo = [(i, w) for i, w in enumerate(windows) if i not in done]
    failed: dict[int, str] = {}
    bar = tqdm(total=len(windows), initial=len(done), desc=Path(spec.scene).name, unit="tile",
               disable=not progress)
    try:
        active = pool or RayPool(predictor, settings).__enter__()
        before = (active.stats.resubmitted_tiles, active.stats.replaced_workers)  # a shared pool counts on
        try:
            for batch in (active.map(spec, todo, int(settings["run"]["batch_size"])) if todo else []):
                for res in batch:
                    if res.status == "failed":
                        failed[res.index] = res.error or "unknown error"
                        continue
                    store.save(res)
                    take(res)
                    done[res.index] = res.status
                    found += len(res.instances)
                bar.update(len(batch))
                bar.set_postfix(instances=found)
            summary.resubmitted_tiles = active.stats.resubmitted_tiles - before[0]
            summary.worker_restarts = active.stats.replaced_workers - before[1]
        finally:
            if pool is None:
                active.__exit__(None, None, None)
    except KeyboardInterrupt:
        raise Interrupted(len(done), len(windows), store.directory) from None
    finally:
        bar.close()
    summary.tiles_nodata = sum(status == "nodata" for status in done.values())
    summary.failed = [{"window": [int(windows[i].col_off), int(windows[i].row_off), int(windows[i].width),
                                  int(windows[i].height)], "error": error} for i, error in sorted(failed.items())]


def run_metadata(predictor: Callable, settings: dict[str, Any], summary: RunSummary) -> dict[str, Any]:
    """What produced this output: stored in the GeoPackage and in the run report."""
    return {
        "scene": summary.scene if is_virtual(summary.scene) else os.path.abspath(summary.scene),
        "checkpoint": getattr(predictor, "checkpoint", None),
        "predictor": predictor_identity(predictor),
        "model_config": getattr(predictor, "config", None),
        "pipeline_config": settings,
        "tiles": summary.tiles,
        "failed_windows": summary.failed,
        "complete": summary.complete,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_features(features: Iterable[Feature], writer: GeoPackageWriter, names: list[str] | None,
                   quicklook: Quicklook | None) -> None:
    """Stream the polygons into the GeoPackage layer (and onto the quicklook), a batch at a time."""
    features = iter(features)
    while batch := list(itertools.islice(features, WRITE_BATCH)):
        geoms, labels, scores = zip(*batch)
        writer.write(geoms, labels, [label_name(names, label) for label in labels], scores)
        if quicklook is not None:
            quicklook.draw(geoms, labels)


def sidecar(output: Path, suffix: str) -> Path:
    """`out.gpkg` -> `out.quicklook.png`, `out.report.json`."""
    return output.with_name(output.stem + suffix)


def write_report(path: Path, summary: RunSummary, metadata: dict[str, Any]) -> None:
    """The run report (JSON): what produced the output, the counts and the timings."""
    report = {**metadata, "summary": dataclasses.asdict(summary)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))


def check_output(output: Path) -> None:
    """Refuse an unusable output before any tile is computed."""
    if output.suffix.lower() != ".gpkg":
        raise UserError(f"{output}: the output must be a GeoPackage (.gpkg)")
    check_writable(output, overwrite=True)


def reusable_output(output: Path, layer: str, result_key: str, overwrite: bool, keep_other_layers: bool) -> bool:
    """True when `output` already holds this result, complete; raises when it holds something else that
    may not be replaced. An incomplete result of the same run is ours to redo."""
    if not output.exists():
        return False
    previous = read_run_metadata(output, layer) or {}
    same = previous.get("result_fingerprint") == result_key
    if same and previous.get("complete") and not (overwrite and not keep_other_layers):
        return True
    if not (same or overwrite or keep_other_layers):
        raise UserError(f"{output}: file exists (use --overwrite to replace it)")
    return False
