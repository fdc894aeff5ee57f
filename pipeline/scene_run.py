"""One scene of a job, from its plan to its written output.

The spine (`run.run_job`) drives many of these at once: while one scene's last tiles are in the model, the
next scene is planned and its tiles follow; a finished scene merges what is left, closes its output and
writes its report on the job's output thread. A `SceneRun` is touched by the job's main thread until its
last tile is taken, and by the output thread after that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from core.cluster import SideCall
from core.errors import UserError
from core.files import atomic_path, check_not_input, check_writable, exclusive, lock_path, remove_leftovers
from pipeline.features import Rows
from pipeline.merge import SceneMerge, SeamRule
from pipeline.quicklook import Quicklook
from pipeline.raster import (Overview, SceneInfo, band_nodata, compute_scaling, first_look, is_virtual, open_scene,
                             resolve_bands, scaling_mode)
from pipeline.scenes import fingerprint, scene_identity
from pipeline.store import TileStore, state_dir
from pipeline.style import label_name
from pipeline.summary import RunSummary
from pipeline.worker import SCORE_BINS, SceneSpec, TileOutput, union_rows
from pipeline.writers import read_result_fingerprint, writer_for
from pipeline.writers.base import Writer, sidecar
from pipeline.settings import Settings

WRITE_BATCH = 5000  # rows per write (an Arrow batch, a Parquet row group): bounded memory for millions
OUTPUT_FORMAT = 2  # bumped when the same inputs give other rows (2: the seam rule of 2026-12)


@dataclass(frozen=True)
class SceneTask:
    """What to run: a scene, where its output goes, what it is called there."""

    scene: str
    output: Path
    layer: str
    sidecar_base: Path  # the quicklook and the report are named after it
    keep_other_layers: bool = False  # add a layer to the file at `output` (one file for many scenes)

    @property
    def report(self) -> Path:
        return sidecar(self.sidecar_base, ".report.json")

    @property
    def store(self) -> Path:
        return state_dir(self.output, self.layer if self.keep_other_layers else None)

    def check(self, inputs: list[Any]) -> None:
        """Refuse an output that cannot be written or would destroy an input, before any work."""
        check_output(self.output)
        for path in (*writer_for(self.output).files(self.output), sidecar(self.sidecar_base, ".quicklook.png"),
                     self.report, lock_path(self.output)):
            check_not_input(path, inputs)
        check_not_input(self.store, inputs, "saved-tiles folder")


def check_output(output: Path) -> None:
    writer_for(output)  # a format this tool writes
    check_writable(output, overwrite=True)


def scene_spec(scene: str, info: SceneInfo, settings: Settings,
               look: Callable[[], tuple[Overview | None, list[str]]]) -> SceneSpec:
    """How workers turn this scene's windows into rows (bands, nodata, scaling, thresholds, plan, rule).
    `look`: the scene's decimated read, waited for only when the scaling needs its statistics."""
    from pipeline.windows import plan_windows

    r, m = settings.run, settings.merge
    bands = resolve_bands(settings.bands, info.count, scene, info.alpha)
    overview = look()[0] if scaling_mode(settings, info) == "percentile" else None
    return SceneSpec(scene=absolute_scene(scene), bands=bands,
                     nodata=band_nodata(settings.nodata, info, bands, scene),
                     scaling=compute_scaling(scene, info, settings, bands, overview), masked=info.masked,
                     score_threshold=float(r.score_threshold), mask_threshold=float(r.mask_threshold),
                     grid=plan_windows(info.width, info.height, settings.tile, settings.overlap),
                     rule=SeamRule(float(m.iou_threshold), float(m.ios_threshold), m.class_agnostic, m.edge_margin),
                     transform=info.transform, crs=info.crs, simplify=float(r.simplify),
                     min_part_px=settings.min_part_px, min_area=float(r.min_area))


def absolute_scene(scene: str) -> str:
    """The scene as other processes must name it (Ray workers, on other nodes or in another working directory;
    the run's record): an absolute path, or the GDAL virtual path as given."""
    return str(scene) if is_virtual(scene) else os.path.abspath(scene)


class SceneLook:
    """The scene's decimated read (`raster.first_look`: collar check, statistics, the quicklook's picture),
    started by `start` and waited for when called. It decodes every block of a scene without overviews (about
    a millisecond of CPU per 512 px tile), so in a run it goes to a model worker's side thread (`side`), off
    the driver.

    A run starts it when the scene's first tile is in, not when the scene is planned: at the job's start it
    took CPU from the model workers' first reads (0.6 s before the first model call of a 2-core job, 0.05 s
    without). Only a percentile scaling needs it at once, to plan the scene."""

    def __init__(self, scene: str, info: SceneInfo, settings: Settings,
                 side: Callable[..., SideCall] = SideCall.here):
        bands = resolve_bands(settings.bands, info.count, scene, info.alpha)
        self.parts = (absolute_scene(scene), info, bands, band_nodata(settings.nodata, info, bands, scene))
        self.side = side
        self.call: SideCall | None = None
        self.result: tuple[Overview | None, list[str]] | None = None

    def start(self) -> None:
        if self.call is None and self.result is None:
            self.call = self.side(first_look, *self.parts)

    def __call__(self) -> tuple[Overview | None, list[str]]:
        if self.result is None:
            self.start()
            self.result = self.call.result()
            self.call = None
        return self.result


class SceneRun:
    def __init__(self, number: int, task: SceneTask, settings: Settings, identity: dict[str, Any],
                 metadata: Callable[[RunSummary], dict[str, Any]], class_names: list[str] | None,
                 side: Callable[..., SideCall] = SideCall.here):
        """`side`: where the scene's short jobs (overview read, quicklook) run, `RayPool.side` in a job."""
        self.number, self.task, self.settings, self.side = number, task, settings, side
        self.identity, self.describe, self.names = identity, metadata, class_names
        self.previous: SceneRun | None = None  # one file for many scenes: the scene whose layer goes in first
        r = settings.run
        self.summary = RunSummary(scene=str(task.scene), output=str(task.output),
                                  layer=task.layer if writer_for(task.output).layers else "",
                                  score_threshold=float(r.score_threshold),
                                  dropped_scores=[0] * SCORE_BINS)
        self.stack = contextlib.ExitStack()
        self.remaining: set[int] = set()
        self.failed: dict[int, str] = {}
        self.nodata = 0
        self.writer: Writer | None = None
        self.failure: BaseException | None = None  # of the output thread (saving, writing): `take`, `finish` raise it
        self.quicklook: Quicklook | None = None
        self.backlog: list[Rows] = []  # rows waiting for the output to open (after `previous` is written)
        self.finished = False
        self.written = 0  # rows in the output
        self.busy = 0.0  # seconds of the main thread spent on this scene's tiles

    # --- main thread ---------------------------------------------------------------------------------
    def plan(self) -> list[int] | None:
        """Open the scene, hold its output, load saved tiles; the window indices still to compute, or None
        when the output already holds this very result (`summary.up_to_date`)."""
        try:
            return self.start()
        except BaseException:
            self.stack.close()  # the output's lock, if it was taken
            raise

    def start(self) -> list[int] | None:
        t = time.perf_counter()
        task = self.task
        self.info = open_scene(task.scene)
        self.look = SceneLook(task.scene, self.info, self.settings, self.side)
        self.spec = scene_spec(task.scene, self.info, self.settings, self.look)
        if not task.keep_other_layers:  # one run per output at a time (a many-scene file: the job holds it)
            self.stack.enter_context(exclusive(task.output))
        for path in (*writer_for(task.output).files(task.output), sidecar(task.sidecar_base, ".quicklook.png"),
                     task.report):
            remove_leftovers(path)  # what a run killed while writing left (the output is held: none is live)
        # Saved tiles hold settled polygons: everything in the spec (reading, thresholds, plan, seam rule,
        # georeferencing, simplification) decides them.
        key = fingerprint({"scene": scene_identity(task.scene), "predictor": self.identity, "spec": self.spec})
        self.result_key = fingerprint({"tiles": key, "format": OUTPUT_FORMAT})
        if reusable_output(task.output, task.layer, task.report, self.result_key,
                           self.settings.run.overwrite, task.keep_other_layers):
            self.summary.up_to_date = True
            self.stack.close()
            return None
        self.store = TileStore(task.store, key)
        self.stack.callback(self.store.close)  # the log is appended to until the scene ends, either way
        self.summary.stale_state_cleared = self.store.stale
        self.summary.tiles = len(self.spec.grid)
        meter = self.spec.meter
        self.merge = SceneMerge(self.spec.grid, self.spec.rule, partial(union_rows, spec=self.spec, meter=meter))
        self.remaining = set(range(len(self.spec.grid)))
        for saved in self.store.saved(self.number):
            self.backlog.append(self.take(saved, saved=True))  # written with the first rows of this run
            self.summary.tiles_resumed += 1
        self.planned = self.last_tile = time.perf_counter()
        self.summary.seconds["plan"] = self.planned - t
        return sorted(self.remaining)

    @property
    def complete(self) -> bool:
        return not self.remaining

    def take(self, out: TileOutput, saved: bool = False) -> Rows:
        """One finished window; returns the rows now settled in their place. An error of the output thread
        (saving a tile, writing rows) stops the scene here rather than after its last tile."""
        if self.failure is not None:
            raise self.failure
        t = time.perf_counter()
        if not saved:
            self.summary.timeline.setdefault("first_tile", time.time())
        self.remaining.discard(out.index)
        if out.status == "failed":
            self.failed[out.index] = out.error or "unknown error"
            self.merge.take(out.index, Rows.empty(), [], Rows.empty())
        else:
            self.nodata += out.status == "nodata"
            window = self.spec.grid[out.index]
            self.merge.take(out.index, out.final, out.pending.instances(window, out.index), out.pending_rows)
            self.summary.raw_instances += out.detections
            self.summary.dropped_scores = [a + int(b) for a, b in zip(self.summary.dropped_scores, out.dropped)]
            self.summary.best_dropped_score = max(self.summary.best_dropped_score, out.best_dropped)
        rows = self.merge.flush()
        self.last_tile = time.perf_counter()
        self.busy += self.last_tile - t
        return rows

    # --- output thread ---------------------------------------------------------------------------------
    def record(self, out: TileOutput, rows: Rows) -> None:
        """Save a computed window for a resume, then write the rows its arrival settled (`take`). Saving here,
        not on the main thread, keeps the file writes off the thread that bounds how many tiles one driver
        takes per second; the output thread runs in order, so a scene's tiles are saved before it finishes
        or is aborted."""
        if self.failure is None and out.status != "failed":
            try:
                self.store.save(out)
            except BaseException as error:
                self.failure = error
        self.write(rows)

    def write(self, rows: Rows) -> None:
        """Stream rows into the output, WRITE_BATCH at a time: each batch has a fixed cost whatever it holds
        (an Arrow batch, a Parquet row group, a pass of the quicklook's drawing); held back until the
        previous scene of the same file is written. Nobody waits on this call: an error is kept for `finish`
        to raise, and the rows after it are not written."""
        if self.failure is not None:
            return
        self.backlog.append(rows)
        try:
            self.look.start()  # the first tile is in: the scene's overview is read while the rest come
            if sum(len(r) for r in self.backlog) >= WRITE_BATCH:
                self.write_backlog()
        except BaseException as error:
            self.failure = error

    def write_backlog(self) -> None:
        if self.writer is None and self.previous is not None and not self.previous.finished:
            return
        if self.writer is None:
            self.open_output()
        rows = Rows.concat(self.backlog)
        self.backlog = []
        for start in range(0, len(rows), WRITE_BATCH):
            batch = rows.take(np.arange(start, min(start + WRITE_BATCH, len(rows))))
            self.writer.write(batch, [label_name(self.names, c) for c in batch.class_ids.tolist()])
            self.written += len(batch)
            if self.quicklook is not None:
                self.quicklook.draw(batch.wkb, batch.class_ids)

    def open_output(self) -> None:
        task = self.task
        self.writer = self.stack.enter_context(writer_for(task.output)(
            task.output, self.info.crs, layer=task.layer, overwrite=True, class_names=self.names,
            keep_other_layers=task.keep_other_layers))
        overview, notes = self.look()
        self.summary.warnings += notes
        if self.settings.run.quicklook and overview is not None:
            self.quicklook = Quicklook(task.scene, self.info, self.spec.bands, self.spec.scaling,
                                       class_names=self.names, overview=overview, side=self.side)

    def finish(self) -> RunSummary:
        """Merge what is left, close the output (it appears now), write the sidecars, clean up. On an error
        before the output appears, its temporary file goes and its lock is released."""
        try:
            return self.close_output()
        except BaseException:
            self.abort()
            raise

    def close_output(self) -> RunSummary:
        t = time.perf_counter()
        summary = self.summary
        if self.failure is not None:
            raise self.failure
        summary.seconds["tiles"] = self.last_tile - self.planned
        self.backlog.append(self.merge.flush(last=True))
        self.write_backlog()
        summary.merged_instances = self.written
        summary.left_out = self.merge.objects - self.written
        summary.tiles_nodata = self.nodata
        grid = self.spec.grid
        summary.failed = [{"window": [grid[i].col0, grid[i].row0, grid[i].width, grid[i].height], "error": e}
                          for i, e in sorted(self.failed.items())]
        if summary.merged_instances == 0:
            summary.warnings.append(nothing_kept(summary))
        summary.seconds["driver on tiles"] = self.busy
        metadata = {**self.describe(summary), "result_fingerprint": self.result_key}
        self.writer.set_metadata(metadata)
        summary.seconds["merge+write"] = time.perf_counter() - t
        if not self.writer.records_run:  # the report is the record: an older one must not outlive its output
            self.task.report.unlink(missing_ok=True)
        self.stack.close()  # the output appears; the lock is released after it
        summary.timeline["written"] = time.time()
        if self.quicklook is not None:
            self.quicklook.save(sidecar(self.task.sidecar_base, ".quicklook.png"))
        write_report(self.task.report, summary, metadata)
        if summary.complete:
            self.store.remove()
        self.finished = True
        return summary

    def abort(self) -> None:
        """Stop without an output: the temporary file goes, saved tiles and the input stay."""
        self.stack.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)


def nothing_kept(summary: RunSummary) -> str:
    """Why an output holds no object, and what to try: an empty layer must not look like a finished survey."""
    if summary.raw_instances:
        return (f"no object kept: all {summary.left_out} objects were under --min-area (or reduced to nothing)")
    best = summary.best_dropped_score
    return ("no object kept: the model scored nothing at or above the score threshold "
            f"{summary.score_threshold:g}" + (f" (highest score seen {best:.3f}; lower --score-threshold to keep "
                                              "weaker detections)" if best >= 0 else " (no detection at all)"))


def write_report(path: Path, summary: RunSummary, metadata: dict[str, Any]) -> None:
    """The run report (JSON): what produced the output, the counts and the timings."""
    report = {**metadata, "summary": dataclasses.asdict(summary)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str))


def reusable_output(output: Path, layer: str, report: Path, result_key: str, overwrite: bool,
                    keep_other_layers: bool) -> bool:
    """True when `output` already holds this result, complete; raises when it holds something else that
    may not be replaced. An incomplete result of the same run is ours to redo."""
    if not output.exists():
        return False
    fingerprint, complete = read_result_fingerprint(output, layer, report) or (None, False)
    same = fingerprint == result_key
    if same and complete and not (overwrite and not keep_other_layers):
        return True
    if not (same or overwrite or keep_other_layers):
        raise UserError(f"{output}: file exists (use --overwrite to replace it)")
    return False


def run_metadata(predictor_identity: dict[str, Any], checkpoint: str | None, model_config: Any,
                 settings: Settings, summary: RunSummary) -> dict[str, Any]:
    """What produced this output: stored in the output where its format keeps metadata, and in the run report."""
    return {
        "scene": absolute_scene(summary.scene),
        "checkpoint": checkpoint,
        "predictor": predictor_identity,
        "model_config": model_config,
        "pipeline_config": settings.to_dict(),
        "tiles": summary.tiles,
        "failed_windows": summary.failed,
        "complete": summary.complete,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
