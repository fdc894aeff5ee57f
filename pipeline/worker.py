"""The body of a model worker (a Ray actor): windows in, settled map polygons and seam fragments out.

Everything a tile needs happens here, where the tile is: read and normalize the window, run the model,
turn its output into compact instances, settle the objects that lie in the window's private region (they
are final), and turn final objects, and the fragments left for the seam merge, into map polygons with
their true areas. Only rows of WKB and a few flat arrays go back to the driver.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from affine import Affine

from pipeline.features import AreaMeter, Rows
from pipeline.instances import Instance, InstanceBlock, from_output, to_numpy
from pipeline.merge import MergedObject, SeamRule, settle_tile
from pipeline.polygonize import masks_to_geometries
from pipeline.raster import Scaling, normalize, read_window
from pipeline.windows import WindowGrid

if TYPE_CHECKING:  # the driver never imports torch (~600 MB); the workers do, to run the model
    import torch

SCORE_BINS = 10  # histogram of the scores a tile dropped under the threshold, over [0, 1]
# GDAL's block cache in a model worker. Its default, 5 % of the machine's memory, fills with the decoded
# blocks of a scene whose dataset the worker keeps open: +1.2 GB over a 20000^2 RGB scene on a 24 GB machine,
# memory growing with the scene. 128 MiB holds a row of 576 px windows across a 20000 px wide RGB scene, so
# the blocks shared by neighbouring windows are still decoded once.
BLOCK_CACHE_BYTES = 128 * 2**20


@dataclass(frozen=True)
class SceneSpec:
    """Everything a worker needs to turn a window of a scene into rows: reading, thresholds, the window plan
    and seam rule (to settle), and the georeferencing (to make map polygons and measure them)."""

    scene: str
    bands: list[int]
    nodata: float | None
    scaling: Scaling
    score_threshold: float
    mask_threshold: float
    grid: WindowGrid
    rule: SeamRule
    transform: Affine
    crs: str  # WKT
    simplify: float = 0.0
    min_part_px: int = 0  # specks: parts of a multipart object under this many pixels are left out
    min_area: float = 0.0  # objects under this many square metres are left out
    masked: bool = False  # validity also from the scene's alpha band or GDAL mask

    @property
    def meter(self) -> AreaMeter:
        centre = self.transform * (self.grid.width / 2, self.grid.height / 2)
        return AreaMeter(self.crs, centre)


@dataclass
class TileOutput:
    scene: int  # the scene's number in the job
    index: int  # the window's index in the scene's plan
    status: str  # "ok" | "nodata" | "failed"
    final: Rows = field(default_factory=Rows.empty)  # objects settled in the worker
    pending: InstanceBlock = field(default_factory=lambda: InstanceBlock.of([]))  # fragments for the seam merge
    pending_rows: Rows = field(default_factory=Rows.empty)  # their own outlines, used when one stands alone
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(SCORE_BINS, dtype=np.int64))
    best_dropped: float = -1.0  # the highest score under the threshold (-1: none)
    error: str | None = None

    @property
    def detections(self) -> int:
        return len(self.final) + len(self.pending)


def to_tensor(raw: np.ndarray, valid: np.ndarray, scaling: Scaling) -> torch.Tensor:
    import torch

    image = normalize(raw, scaling)
    if not valid.all():
        image[:, ~valid] = 0.0
    return torch.from_numpy(image)


def tile_output(scene: int, index: int, spec: SceneSpec, instances: list[Instance], meter: AreaMeter) -> TileOutput:
    """Settle a tile's instances and make rows of them (see the module docstring)."""
    final, pending = settle_tile(instances, spec.grid, index, spec.rule)
    geoms = masks_to_geometries([o.mask() for o in final] + [(m.mask, m.row, m.col) for m in pending],
                                spec.transform, spec.simplify, spec.min_part_px)
    n = len(final)
    return TileOutput(
        scene, index, "ok",
        final=Rows.of([o.key for o in final], geoms[:n], [o.label for o in final], [o.score for o in final], meter,
                      spec.min_area),
        pending=InstanceBlock.of(pending),
        # A fragment's own outline stands in for its object when nothing joins it: the same limits apply.
        pending_rows=Rows.of([m.key for m in pending], geoms[n:], [m.label for m in pending],
                             [m.score for m in pending], meter, spec.min_area))


def union_rows(objects: list[MergedObject], spec: SceneSpec, meter: AreaMeter) -> Rows:
    """Rows of objects united from several views (the driver's share of polygonizing)."""
    geoms = masks_to_geometries([o.mask() for o in objects], spec.transform, spec.simplify, spec.min_part_px)
    return Rows.of([o.key for o in objects], geoms, [o.label for o in objects], [o.score for o in objects], meter,
                   spec.min_area)


class TileWorker:
    """One predictor (model) loaded once, many batches of windows.

    The actor runs several `process` calls at a time (Ray `max_concurrency`) but one model forward: while
    one batch is in the model, the next ones are read and normalized, and the previous one is settled and
    polygonized (GDAL, numpy and torch release the GIL), so all of it hides behind the model.
    """

    def __init__(self, predictor: Callable, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        rasterio.env.set_gdal_config("GDAL_CACHEMAX", BLOCK_CACHE_BYTES)  # this process's cache (an actor's own)
        self.predictor = predictor
        self.model_lock = threading.Lock()
        self.meters: dict[tuple[str, tuple[float, float]], AreaMeter] = {}
        self.open = threading.local()  # per thread (a dataset is not thread-safe): the last scene, kept open
        load = getattr(predictor, "load", None)
        if callable(load):
            load()  # load the model now, while the driver is still planning, not on the first batch

    def ready(self) -> bool:
        return True

    def side(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a short job of the driver's (`RayPool.side`) in this warm process, beside the batches: pure
        functions of their arguments, so they share nothing with `process`."""
        return fn(*args)

    def meter(self, spec: SceneSpec) -> AreaMeter:
        meter = spec.meter
        return self.meters.setdefault((meter.crs, meter.centre), meter)  # its transformer is made once

    def dataset(self, path: str) -> rasterio.DatasetReader:
        """This thread's open dataset of `path`: windows of a scene come in runs, and opening costs ~1-2 ms."""
        held = getattr(self.open, "dataset", None)
        if held is None or held.name != path:
            if held is not None:
                held.close()
            held = self.open.dataset = rasterio.open(path)
        return held

    def process(self, specs: dict[int, SceneSpec], items: list[tuple[int, int]]) -> list[TileOutput]:
        """Windows `items` ((scene number, window index)) of the scenes in `specs` -> their outputs."""
        results: list[TileOutput] = []
        images, kept = [], []
        for scene, index in items:
            spec = specs[scene]
            window = spec.grid[index]
            try:
                raw, valid = read_window(self.dataset(spec.scene), window, spec.bands, spec.nodata, spec.masked)
            except Exception as exc:  # a corrupt block fails its window, not the run
                results.append(TileOutput(scene, index, "failed", error=f"{type(exc).__name__}: {exc}"))
                continue
            if not valid.any():
                results.append(TileOutput(scene, index, "nodata"))
                continue
            images.append(to_tensor(raw, valid, spec.scaling))
            kept.append((scene, index, valid))
        if images:
            import torch

            with self.model_lock, torch.inference_mode():  # no autograd, whatever predictor was passed
                outputs = self.predictor(images)
            for (scene, index, valid), out in zip(kept, outputs):
                spec = specs[scene]
                instances = from_output(out, spec.grid[index], index, valid, spec.mask_threshold, spec.score_threshold)
                result = tile_output(scene, index, spec, instances, self.meter(spec))
                result.dropped, result.best_dropped = dropped_scores(out, spec.score_threshold)
                results.append(result)
        return sorted(results, key=lambda r: (r.scene, r.index))


def dropped_scores(output: dict, threshold: float) -> tuple[np.ndarray, float]:
    """Histogram and maximum of the scores a tile dropped under the threshold: the model's own output under
    it, and `dropped_scores` when the model already left them out (the checkpoint model does)."""
    scores = to_numpy(output["scores"]).astype(np.float64).ravel()
    below = scores[scores < threshold]
    if "dropped_scores" in output:
        below = np.concatenate([below, to_numpy(output["dropped_scores"]).astype(np.float64).ravel()])
    histogram = np.histogram(below, bins=SCORE_BINS, range=(0.0, 1.0))[0].astype(np.int64)
    return histogram, float(below.max()) if below.size else -1.0
