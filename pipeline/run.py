"""The `run` spine: plan -> tiles (store, pool) -> streaming merge -> polygons -> writer.

Like torchvision's generalized_rcnn.py, this module only composes the stages, each a module of its own:
`scene_run` plans a scene and holds its output, `pool` runs the windows on the model workers (`worker`
settles each tile and polygonizes its final objects where it is computed), `merge.SceneMerge` joins the
fragments across seams as soon as their neighbours are done, and the writer streams the rows out. Scenes
flow into each other: the next scene's tiles are in the workers while the previous one merges and writes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.cluster import SideCall
from core.errors import UserError
from pipeline.pool import Batch, RayPool, batch_size_at
from pipeline.predict import CheckpointPredictor
from pipeline.scene_run import SceneRun, SceneTask, run_metadata
from pipeline.scenes import scene_name
from pipeline.settings import Settings, load_settings, settings_overrides
from pipeline.summary import RunSummary, interrupted
from pipeline.worker import TileOutput


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


def run_job(tasks: list[SceneTask], predictor: Callable, settings: Settings, pool: RayPool | None = None,
            progress: bool = True) -> Iterator[RunSummary]:
    """Run every scene task and yield each scene's summary, in task order, as its output is written.

    `pool`: running model workers to use (the CLI's); by default Ray is started here and stopped at the end.
    Ctrl-C raises `core.errors.Interrupted` once the tiles done so far are saved; a rerun resumes from them.
    """
    threshold = settings.run.score_threshold
    if isinstance(predictor, CheckpointPredictor) and predictor.score_threshold > threshold:
        raise UserError(f"the predictor skips detections under {predictor.score_threshold} but this run keeps "
                        f"those from {threshold}: build it with score_threshold <= the run's")
    identity = predictor_identity(predictor)
    describe = partial(run_metadata, identity, getattr(predictor, "checkpoint", None),
                       getattr(predictor, "config", None), settings)
    runs: dict[int, SceneRun] = {}  # scenes whose tiles are under way
    finishing: deque[tuple[SceneRun, Future]] = deque()  # scenes handed to the output thread, in task order
    errors: list[UserError] = []
    output = ThreadPoolExecutor(max_workers=1, thread_name_prefix="output")
    bar = tqdm(total=0, desc="tiles", unit="tile", disable=not progress)
    batch_size, workers, queued = settings.run.batch_size, settings.run.workers, settings.run.batches_in_flight
    active = pool

    def side(fn: Callable, *args: Any) -> SideCall:  # the scenes' short jobs, beside the model (`RayPool.side`)
        return active.side(fn, *args)

    planner = Planner(tasks, lambda number, task: SceneRun(number, task, settings, identity, describe,
                                                           class_names_of(predictor), side))

    def hand_over(run: SceneRun) -> None:
        """A scene's last tile is in: the rest of its work goes to the output thread."""
        del runs[run.number]
        finishing.append((run, output.submit(run.finish)))

    def batches() -> Iterator[Batch]:
        """The job's windows in batches (a batch may span scenes; the last scene's end in smaller ones, so that
        the workers finish together), scenes planned ahead of their turn."""
        items: list[tuple[int, int]] = []
        specs: dict[int, Any] = {}
        previous: SceneRun | None = None
        try:
            for run, todo in planner:
                if todo is None:
                    finishing.append((run, resolved(run.summary)))
                    continue
                if run.task.keep_other_layers:
                    run.previous = previous  # its layer goes into the file after the previous scene's
                previous = runs[run.number] = run
                bar.total += run.summary.tiles
                bar.update(run.summary.tiles - len(todo))
                bar.set_description(Path(run.task.scene).name)
                if not todo:
                    hand_over(run)
                last = planner.exhausted  # the job's last tiles: sized to end together
                for k, index in enumerate(todo):
                    items.append((run.number, index))
                    specs[run.number] = run.spec
                    left = len(todo) - k - 1 + len(items)
                    if len(items) >= (batch_size_at(left, batch_size, workers, queued) if last else batch_size):
                        yield specs, items
                        items, specs = [], {}
        except UserError as exc:  # a scene that cannot run: those before it finish and are written first
            errors.append(exc)
        if items:
            yield specs, items

    def written() -> Iterator[RunSummary]:
        while finishing and finishing[0][1].done():
            yield finishing.popleft()[1].result()

    try:
        if active is None:
            active = RayPool(predictor, settings).__enter__()
        stats = (active.stats.resubmitted_tiles, active.stats.replaced_workers, active.stats.out_of_memory)
        detections = 0  # the job's, for the progress bar (finished scenes leave `runs`)
        for outputs in active.map(batches()):
            for out in outputs:
                detections += out.detections
                run = runs[out.scene]
                output.submit(run.record, out, run.take(out))
                if run.complete:
                    run.summary.resubmitted_tiles = active.stats.resubmitted_tiles - stats[0]
                    run.summary.worker_restarts = active.stats.replaced_workers - stats[1]
                    if active.stats.out_of_memory > stats[2]:
                        run.summary.warnings.append(
                            f"{active.stats.out_of_memory - stats[2]} worker(s) killed by Ray's memory monitor were "
                            f"replaced and their tiles computed again; batches queued per worker lowered to "
                            f"{active.stats.in_flight} (lower --batch-size or run fewer --workers per machine)")
                    hand_over(run)
            bar.update(len(outputs))
            bar.set_postfix(detections=detections)
            yield from written()
        for run in list(runs.values()):  # never: every window comes back, computed or failed; but if one
            for index in sorted(run.remaining):  # did not, the output must say so rather than claim complete
                output.submit(run.write, run.take(TileOutput(run.number, index, "failed", error="no result came back")))
            hand_over(run)
        while finishing:
            finishing[0][1].result()
            yield from written()
    except BaseException as exc:  # Ctrl-C, the caller closing the job, an error: scenes under way stop
        saved = [(len(r.spec.grid) - len(r.remaining), len(r.spec.grid), r.task.store) for r in runs.values()]
        for run in runs.values():
            output.submit(run.abort)
        if isinstance(exc, KeyboardInterrupt):
            raise interrupted(saved) from None
        raise
    finally:
        planner.close()
        output.shutdown(wait=True)
        bar.close()
        if pool is None and active is not None:
            active.__exit__(None, None, None)
    if errors:
        raise errors[0]


class Planner:
    """The job's scenes planned in order, `ahead` of their turn, on a thread of their own: opening a scene,
    holding its output, reading its statistics (percentile scaling) and replaying its saved tiles hide behind
    the previous scene's tiles instead of stalling the workers between scenes."""

    def __init__(self, tasks: list[SceneTask], make: Callable[[int, SceneTask], SceneRun], ahead: int = 2):
        self.tasks, self.make, self.ahead = list(enumerate(tasks)), make, ahead
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan")
        self.queue: deque[tuple[SceneRun, Future]] = deque()

    def fill(self) -> None:
        while self.tasks and len(self.queue) < self.ahead:
            run = self.make(*self.tasks.pop(0))
            self.queue.append((run, self.thread.submit(run.plan)))

    def __iter__(self) -> Iterator[tuple[SceneRun, list[int] | None]]:
        """(run, window indices to compute or None when up to date), in task order; a scene that cannot be
        planned raises its error here, in its turn."""
        self.fill()
        while self.queue:
            run, planned = self.queue.popleft()
            self.fill()
            yield run, planned.result()

    @property
    def exhausted(self) -> bool:
        """No scene after those handed out."""
        return not self.tasks and not self.queue

    def close(self) -> None:
        """Release what scenes planned ahead hold (their outputs' locks) when the job stops early."""
        self.tasks = []
        for run, planned in self.queue:
            if planned.exception() is None:
                run.stack.close()
        self.queue.clear()
        self.thread.shutdown(wait=True)


def resolved(summary: RunSummary) -> Future:
    future: Future = Future()
    future.set_result(summary)
    return future


def run_scene(
    scene: str,
    output: str | Path,
    predictor: Callable | None = None,
    *,
    checkpoint: str | None = None,
    config: str | Path | None = None,
    progress: bool = True,
    pool: RayPool | None = None,
    **options: Any,
) -> RunSummary:
    """Run the whole pipeline on one scene and write its polygons to `output`, in the format of its suffix
    (`pipeline.writers.WRITERS`: .gpkg, .parquet, .fgb, .shp, .geojson).

    `predictor`: any picklable callable taking a list of float32 C x H x W tensors in [0, 1] and returning,
    per tile, torchvision Mask R-CNN's eval output or the compact form (README, "Pluggable model step");
    default: the model in `checkpoint`. `options`: any key of configs/pipeline.yaml (flat names, e.g.
    tile=256, batch_size=4, iou_threshold=0.6). `pool`: reuse running model workers; by default Ray is
    started and stopped here.

    An existing output made from the same scene, model and options is left as it is (`up_to_date`); one
    that is incomplete (failed windows) is redone, anything else needs `overwrite`.
    """
    settings = load_settings(config, settings_overrides(options))
    predictor = predictor or checkpoint_predictor(checkpoint, settings)
    output = Path(output)
    task = SceneTask(scene=str(scene), output=output, layer=settings.run.layer or scene_name(scene),
                     sidecar_base=output)
    task.check([scene, getattr(predictor, "checkpoint", None), config])
    (summary,) = run_job([task], predictor, settings, pool, progress)
    return summary


def checkpoint_predictor(checkpoint: str | None, settings: Settings) -> CheckpointPredictor:
    r = settings.run
    checkpoint = checkpoint or r.checkpoint
    if not checkpoint:
        raise UserError("no model given: pass --checkpoint model.pt (train one with `python -m pipeline train "
                        "--config configs/swin_t.yaml --data DIR --out model.pt`)")
    return CheckpointPredictor(checkpoint, r.device, r.score_threshold, r.mask_threshold, r.precision)
