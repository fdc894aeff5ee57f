"""Ray execution: actors that read their own windows, run the predictor and return compact instances.

The driver never reads the scene. It keeps at most `batches_in_flight` batches queued per actor, so memory
is bounded by tile size x batch x in-flight work whatever the scene size. When an actor dies (killed
process, lost node) the pool replaces it with a fresh one and re-submits its batches; a batch is tried
`MAX_ATTEMPTS` times before its windows are reported as failed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from rasterio.windows import Window

from model.cluster import connect_ray
from model.errors import UserError
from pipeline.instances import Instance, from_tile_prediction
from pipeline.raster import Scaling, normalize, read_window

if TYPE_CHECKING:  # the driver never imports torch (~600 MB); the workers do, to run the model
    import torch

MAX_ATTEMPTS = 3  # per batch; a batch failing this often is reported by window, never silently dropped


@dataclass(frozen=True)
class ReadSpec:
    """Everything a worker needs to turn a window of a scene into model input."""

    scene: str
    bands: list[int]
    nodata: tuple[float, ...] | None  # per band read (raster.band_nodata)
    scaling: Scaling
    score_threshold: float
    mask_threshold: float
    masked: bool = False  # validity also from the scene's alpha band or GDAL mask


@dataclass
class TileResult:
    index: int  # position of the window in the scene's plan
    status: str  # "ok" | "nodata" | "failed"
    instances: list[Instance] = field(default_factory=list)
    error: str | None = None


def to_tensor(raw: np.ndarray, valid: np.ndarray, scaling: Scaling) -> torch.Tensor:
    import torch

    image = normalize(raw, scaling)
    image[:, ~valid] = 0.0
    return torch.from_numpy(image)


class TileWorker:
    """The body of a Ray actor: one predictor (model) loaded once, many batches of windows.

    The actor runs two `process` calls at a time (Ray `max_concurrency=2`) but only one model forward:
    while one batch is in the model, the next one is being read and normalized (GDAL and torch release the
    GIL), so reading hides behind compute.
    """

    def __init__(self, predictor: Callable, threads: int):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.predictor = predictor
        self.model_lock = threading.Lock()
        load = getattr(predictor, "load", None)
        if callable(load):
            load()  # load the model now, while the driver is still planning, not on the first batch

    def ready(self) -> bool:
        return True

    def process(self, spec: ReadSpec, windows: list[tuple[int, Window]]) -> list[TileResult]:
        results: list[TileResult] = []
        images, valids, kept = [], [], []
        for index, window in windows:
            try:
                raw, valid = read_window(spec.scene, window, spec.bands, spec.nodata, spec.masked)
            except Exception as exc:  # a corrupt block fails its window, not the run
                results.append(TileResult(index, "failed", error=f"{type(exc).__name__}: {exc}"))
                continue
            if not valid.any():
                results.append(TileResult(index, "nodata"))
                continue
            images.append(to_tensor(raw, valid, spec.scaling))
            valids.append(valid)
            kept.append((index, window))
        if images:
            import torch

            with self.model_lock, torch.inference_mode():  # no autograd, whatever predictor was passed
                outputs = self.predictor(images)
            for (index, window), valid, out in zip(kept, valids, outputs):
                instances = from_tile_prediction(
                    masks_prob=out["masks"][:, 0].float().numpy(),
                    scores=out["scores"].float().numpy(),
                    labels=out["labels"].numpy(),
                    window=(int(window.col_off), int(window.row_off), int(window.width), int(window.height)),
                    valid=valid,
                    mask_threshold=spec.mask_threshold,
                    score_threshold=spec.score_threshold,
                )
                results.append(TileResult(index, "ok", instances))
        return sorted(results, key=lambda r: r.index)


@dataclass
class PoolStats:
    resubmitted_tiles: int = 0
    replaced_workers: int = 0


class RayPool:
    """Starts (or joins) Ray and keeps a set of TileWorker actors; a context manager that cleans up."""

    def __init__(self, predictor: Callable, settings: dict[str, Any]):
        self.predictor = predictor
        self.run = settings["run"]
        self.started_ray = False
        self.actors: list[Any] = []
        self.stats = PoolStats()

    def __enter__(self) -> "RayPool":
        import ray

        r = self.run
        self.started_ray = connect_ray(r["ray_address"])
        total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        workers = int(r["workers"])
        threads = int(r["threads_per_worker"] or max(1, int(total_cpus // workers)))
        # The pool replaces lost actors itself; two calls at a time overlap reading with the model.
        options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0, "max_concurrency": 2}
        if r["device"] == "cuda":
            gpus = float(ray.cluster_resources().get("GPU", 0.0))
            if gpus < float(r["gpus_per_worker"]):
                raise UserError(f"--device cuda needs {r['gpus_per_worker']} GPU per worker but the Ray cluster "
                                f"has {gpus:g} GPUs")
            options.update(num_gpus=float(r["gpus_per_worker"]), num_cpus=1)
        else:
            options.update(num_cpus=min(float(threads), total_cpus / workers))
        self.actor_class = ray.remote(TileWorker).options(**options)
        self.threads = threads
        self.actors = [self.spawn() for _ in range(workers)]
        try:  # the model loads in each actor's constructor: say so once, clearly, if it cannot
            ray.get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayError as exc:
            self.__exit__(None, None, None)
            cause = getattr(exc, "cause", None) or exc
            detail = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
            raise UserError(f"the Ray workers could not start the model: {detail}") from None
        return self

    def spawn(self) -> Any:
        return self.actor_class.remote(self.predictor, self.threads)

    def __exit__(self, *exc_info: Any) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_ray:
            ray.shutdown()

    def map(self, spec: ReadSpec, windows: list[tuple[int, Window]], batch_size: int) -> Iterator[list[TileResult]]:
        """Yield the results of each batch as it completes (not in order)."""
        import ray

        batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
        queue = [(batch, 0) for batch in reversed(batches)]  # (windows, attempts so far); pop() from the end
        spec_ref = ray.put(spec)
        pending: dict[Any, tuple[int, Any, list[tuple[int, Window]], int]] = {}
        load = [0] * len(self.actors)
        limit = int(self.run["batches_in_flight"])

        def submit() -> None:
            while queue:
                slot = min(range(len(self.actors)), key=load.__getitem__)
                if load[slot] >= limit:
                    return
                batch, attempts = queue.pop()
                actor = self.actors[slot]
                pending[actor.process.remote(spec_ref, batch)] = (slot, actor, batch, attempts)
                load[slot] += 1

        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            slot, actor, batch, attempts = pending.pop(done[0])
            load[slot] -= 1
            try:
                results = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as exc:
                if self.actors[slot] is actor:  # first news of this loss: replace the actor
                    ray.kill(actor)
                    self.actors[slot] = self.spawn()
                    self.stats.replaced_workers += 1
                if attempts + 1 < MAX_ATTEMPTS:
                    self.stats.resubmitted_tiles += len(batch)
                    queue.append((batch, attempts + 1))
                    submit()
                    continue
                reason = f"worker lost {MAX_ATTEMPTS} times: {type(exc).__name__}"
                results = [TileResult(index, "failed", error=reason) for index, _ in batch]
            except ray.exceptions.RayTaskError as exc:  # the predictor raised: a bug or bad model, not retried
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                reason = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
                results = [TileResult(index, "failed", error=reason) for index, _ in batch]
            submit()
            yield results
