"""The Ray pool of model workers: actors that each load the model once and process batches of windows.

The driver never reads a scene. It keeps at most `batches_in_flight` batches queued per actor, pulling
batches from the job lazily, so memory is bounded by tile size x batch x in-flight work whatever the
scenes' sizes, and a job over many scenes flows from one scene into the next without a pause. When an actor
dies (killed process, lost node) the pool replaces it and re-submits its batches; a batch is tried
`MAX_ATTEMPTS` times before its windows are reported as failed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from core.cluster import SideCall, check_gpus, connect_ray, in_flight, lost_worker_errors, shutdown_ray
from core.errors import UserError, reason
from pipeline.worker import SceneSpec, TileOutput, TileWorker
from pipeline.settings import Settings

MAX_ATTEMPTS = 3  # per batch; a batch failing this often is reported by window, never silently dropped

Batch = tuple[dict[int, SceneSpec], list[tuple[int, int]]]  # specs by scene number, (scene, window) items


@dataclass
class PoolStats:
    resubmitted_tiles: int = 0
    replaced_workers: int = 0
    out_of_memory: int = 0  # workers Ray's memory monitor killed
    in_flight: int = 0  # batches queued per worker now (fewer after a worker was killed for memory)


def batch_size_at(left: int, batch_size: int, workers: int, queued: int) -> int:
    """Tiles for the job's next batch when `left` tiles are still to be sent. Full batches until the end is
    near, then smaller ones (guided self-scheduling): with every worker holding `queued` batches beside the
    one in its model, equal batches to the end leave one worker waiting up to a whole batch for another's
    last (0.35 s of a 10 s job on 2 workers at 8 x 50 ms). One worker has nobody to wait for."""
    if workers == 1:
        return batch_size
    return max(1, min(batch_size, -(-left // (workers * (queued + 1)))))


def failed(batch: Batch, reason: str) -> list[TileOutput]:
    return [TileOutput(scene, index, "failed", error=reason) for scene, index in batch[1]]


class RayPool:
    """Starts (or joins) Ray and keeps a set of TileWorker actors; a context manager that cleans up."""

    def __init__(self, predictor: Callable, settings: Settings):
        self.predictor = predictor
        self.run = settings.run
        self.started_ray = False
        self.actors: list[Any] = []
        self.stats = PoolStats()
        self.sides = 0  # side calls sent so far: they go round the actors

    def __enter__(self) -> RayPool:
        self.started_ray = connect_ray(self.run.ray_address)
        try:
            self.start_actors()
        except BaseException:
            self.__exit__(None, None, None)  # nothing this pool started stays behind
            raise
        return self

    def start_actors(self) -> None:
        import ray

        r = self.run
        total_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        workers = r.workers
        threads = r.threads_per_worker or max(1, int(total_cpus // workers))
        # The pool replaces lost actors itself. Calls beyond the one in the model read the next batches and
        # settle the previous one meanwhile.
        options: dict[str, Any] = {"max_restarts": 0, "max_task_retries": 0,
                                   "max_concurrency": r.batches_in_flight + 1}
        check_gpus(r.device, r.gpus_per_worker * workers)
        if r.device == "cuda":
            options.update(num_gpus=r.gpus_per_worker, num_cpus=1)
        else:
            options.update(num_cpus=min(float(threads), total_cpus / workers))
        # `side` calls run on a thread of their own (Ray's concurrency group), never queued behind batches.
        self.actor_class = ray.remote(concurrency_groups={"side": 1})(TileWorker).options(**options)
        self.threads = threads
        self.actors = [self.spawn() for _ in range(workers)]
        try:  # the model loads in each actor's constructor: say so once, clearly, if it cannot
            ray.get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayError as exc:
            raise UserError(f"the Ray workers could not start the model: {reason(exc)}") from None

    def spawn(self) -> Any:
        return self.actor_class.remote(self.predictor, self.threads)

    def side(self, fn: Callable, *args: Any) -> SideCall:
        """`fn(*args)` on a model worker's side thread, beside its batches (`TileWorker.side`). The driver's
        short jobs per scene (its overview read, the quicklook's outlines and page) need a process with
        rasterio and shapely loaded: a Ray task of their own took a fresh Python process whenever none was
        idle, ~1 s of CPU to start, which on a small machine the model workers waited for."""
        actor = self.actors[self.sides % len(self.actors)]
        self.sides += 1
        return SideCall(fn, args, actor.side.options(concurrency_group="side").remote(fn, *args))

    def __exit__(self, *exc_info: Any) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.started_ray:
            shutdown_ray()

    def map(self, batches: Iterator[Batch]) -> Iterator[list[TileOutput]]:
        """Yield each batch's outputs as it completes (not in order), pulling batches only as actors have
        room for them; a lost actor is replaced and its batches tried again (MAX_ATTEMPTS in all)."""
        import ray

        retry: deque[tuple[Batch, int]] = deque()  # (batch, attempts so far)
        load = [0] * len(self.actors)
        self.stats.in_flight = self.stats.in_flight or self.run.batches_in_flight

        def next_item() -> tuple[Batch, int, int, Any] | None:
            """A retry first, else the job's next batch, with the least-loaded actor it goes to."""
            if retry:
                batch, attempts = retry.popleft()
            elif (batch := next(batches, None)) is not None:
                attempts = 0
            else:
                return None
            slot = min(range(len(self.actors)), key=load.__getitem__)
            load[slot] += 1
            return batch, attempts, slot, self.actors[slot]

        def start(item: tuple[Batch, int, int, Any]) -> Any:
            return item[3].process.remote(*item[0])

        def room(_running: int) -> bool:  # per actor, not in all
            return min(load) < self.stats.in_flight

        for (batch, attempts, slot, actor), ref in in_flight(next_item, start, room):
            load[slot] -= 1
            try:
                results = ray.get(ref)
            except lost_worker_errors() as exc:
                if isinstance(exc, ray.exceptions.OutOfMemoryError) or "OutOfMemory" in str(exc):
                    # Ray's memory monitor killed it: a lost worker like any other, and less work queued
                    # at once from now on, so the next one is less likely to go the same way.
                    self.stats.out_of_memory += 1
                    self.stats.in_flight = max(1, self.stats.in_flight - 1)
                if self.actors[slot] is actor:  # first news of this loss: replace the actor
                    ray.kill(actor)
                    self.actors[slot] = self.spawn()
                    self.stats.replaced_workers += 1
                if attempts + 1 < MAX_ATTEMPTS:
                    self.stats.resubmitted_tiles += len(batch[1])
                    retry.append((batch, attempts + 1))
                    continue
                results = failed(batch, f"worker lost {MAX_ATTEMPTS} times: {type(exc).__name__}")
            except ray.exceptions.RayTaskError as exc:  # the predictor raised: a bug or bad model, not retried
                results = failed(batch, reason(exc))
            yield results
