"""Data-parallel training on Ray Train: `python -m pipeline train --workers N`.

Each Ray Train worker is one torch.distributed process (gloo on CPU, nccl on GPU) running the loop of
single-process training (`model.train.run_loop`) around a DistributedDataParallel model: it reads the
rank-th slice of every global batch, DDP averages the gradients in backward, and rank 0 writes the losses
CSV (the means over the workers) and the checkpoint: the plain model's weights and, beside them, the training
state, the files single-process training writes (`model.checkpoint.save_training`). The driver shows rank 0's
progress; Ctrl-C asks rank 0 to stop, every rank stops after the same iteration and the run ends with a
checkpoint there, as in single-process training.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from model.backbones import IMAGENET, resolve_weights_path
from core.yaml_files import merge
from core.errors import UserError, first_line
from core.cluster import check_gpus, connect_ray
from model.train import Plan, ProgressBar, TrainOptions, build_session, plan_training, run_loop


@dataclass(frozen=True)
class WorkerOptions:
    workers: int
    gpus_per_worker: float | None = None  # with device cuda; None: 1
    threads_per_worker: int | None = None  # None: the cluster's CPUs / workers (1 with cuda)
    ray_address: str | None = None  # None: Ray in-process on this machine; "auto" or HOST:PORT: a cluster


def check_worker_options(workers: WorkerOptions, device: str) -> None:
    if workers.workers < 1:
        raise UserError("--workers must be at least 1")
    if workers.gpus_per_worker is not None and device != "cuda":
        raise UserError("--gpus-per-worker needs --device cuda")
    if workers.gpus_per_worker is not None and workers.gpus_per_worker < 1:
        raise UserError("--gpus-per-worker must be at least 1: each worker drives its own GPU (nccl ranks cannot "
                        "share one)")
    if workers.threads_per_worker is not None and workers.threads_per_worker < 1:
        raise UserError("--threads-per-worker must be at least 1")


def absolute_weights(config: dict[str, Any]) -> dict[str, Any]:
    """Workers run in a directory of Ray's: find ImageNet weights here, by absolute path (or refuse now).
    `imagenet` stays as it is, once its file is in this machine's torch hub cache: each worker finds it in
    its own node's cache (fetching it there if needed)."""
    backbone = config["model"]["backbone"]
    if not backbone["weights"]:
        return config
    path = resolve_weights_path(backbone["weights"], backbone["name"])
    if backbone["weights"] == IMAGENET:
        return config
    return merge(config, {"model": {"backbone": {"weights": str(path.resolve())}}})


def worker_resources(workers: WorkerOptions, device: str) -> dict[str, float]:
    """Ray resources of one worker, refused up front when the cluster cannot hold them all (Ray Train would
    wait for them forever)."""
    import ray

    have = ray.cluster_resources()
    n = workers.workers
    if device == "cuda":
        gpus = float(workers.gpus_per_worker or 1.0)
        check_gpus(device, gpus * n)
        return {"CPU": float(workers.threads_per_worker or 1), "GPU": gpus}
    cpus = have.get("CPU", 1.0)
    threads = workers.threads_per_worker or max(1, int(cpus // n))
    if threads * n > cpus:
        raise UserError(f"{n} workers x {threads} threads need {threads * n} CPUs but the Ray cluster has {cpus:g}")
    return {"CPU": float(threads)}


class Progress:
    """A Ray actor between rank 0 and the driver: rows go to the driver's progress bar, and a stop request
    (the driver's Ctrl-C) comes back as the answer to the next push."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.stop_requested = False

    def push(self, row: dict[str, Any]) -> bool:
        self.rows.append(row)
        return self.stop_requested

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows

    def stop(self) -> None:
        self.stop_requested = True


def mean_over_workers(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)  # sum
    return tensor / dist.get_world_size()


def worker_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The body of every Ray Train worker; rank 0's summary becomes the run's result."""
    import ray
    import ray.train
    import ray.train.torch

    plan: Plan = config["plan"]
    options: TrainOptions = config["options"]
    progress = config["progress"]
    torch.set_num_threads(config["threads"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    session = build_session(plan, options, device)
    ddp = DistributedDataParallel(session.model, device_ids=[device.index] if device.type == "cuda" else None)
    return run_loop(session, plan, options, forward=ddp, rank=rank, mean=mean_over_workers,
                    report=lambda row: ray.get(progress.push.remote(row)))


def training_error(exc: Exception) -> Exception:
    """One line for the command line: a worker's UserError as it is, any other failure named by its rank."""
    failures = dict(sorted((getattr(exc, "worker_failures", None) or {}).items()))
    for failure in failures.values():
        if isinstance(failure, UserError):
            return UserError(str(failure))
    if failures:
        rank, failure = next(iter(failures.items()))
        return RuntimeError(f"training worker {rank} failed: {type(failure).__name__}: {first_line(failure)}")
    return RuntimeError(f"Ray Train failed: {first_line(exc)}")


def follow(trainer: Any, progress: Any, plan: Plan, show: bool) -> dict[str, Any]:
    """Run trainer.fit() in a thread and show rank 0's rows here. The first Ctrl-C (or SIGTERM) asks the
    workers to checkpoint and stop, then raises KeyboardInterrupt; a second one stops waiting for them."""
    import ray

    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as exc:
            outcome["error"] = exc

    def show_rows() -> None:
        for row in ray.get(progress.take.remote()):
            bar(row)

    bar = ProgressBar(plan, show)
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)  # a daemon never blocks exit
    thread.start()
    stopping = False
    try:
        while thread.is_alive():
            try:
                thread.join(0.5)
                show_rows()
            except KeyboardInterrupt:
                if stopping:
                    raise
                stopping = True
                progress.stop.remote()
        show_rows()
    finally:
        bar.close()
    if "error" in outcome:
        raise training_error(outcome["error"]) from outcome["error"]
    if stopping:
        raise KeyboardInterrupt
    return outcome["result"].return_value


def train_distributed(config: dict[str, Any], options: TrainOptions, workers: WorkerOptions) -> dict[str, Any]:
    """Train on `workers.workers` Ray Train workers; the same checkpoint, losses CSV and summary as `train`."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    check_worker_options(workers, options.device)
    # Workers run in a directory of Ray's: give them absolute paths.
    options = replace(options, data=options.data.resolve(), out=options.out.resolve())
    plan = plan_training(absolute_weights(config), options, workers.workers)
    started_ray = connect_ray(workers.ray_address)
    try:
        resources = worker_resources(workers, options.device)
        progress = ray.remote(num_cpus=0)(Progress).remote()
        # Ray Train's own run directory (we report no checkpoints to it): beside the output, removed after.
        storage = tempfile.mkdtemp(prefix=f".{options.out.name}.ray-", dir=options.out.parent)
        try:
            trainer = TorchTrainer(
                worker_loop,
                train_loop_config={"plan": plan, "options": options, "progress": progress,
                                   "threads": int(resources["CPU"])},
                torch_config=TorchConfig(backend="nccl" if options.device == "cuda" else "gloo"),
                scaling_config=ScalingConfig(num_workers=workers.workers, use_gpu=options.device == "cuda",
                                             resources_per_worker=resources),
                # No retries: Ray Train would restart the loop from its start; --resume is the way back.
                run_config=RunConfig(name="train", storage_path=storage, failure_config=FailureConfig(max_failures=0)),
            )
            return follow(trainer, progress, plan, options.progress)
        finally:
            ray.kill(progress)
            shutil.rmtree(storage, ignore_errors=True)
    finally:
        if started_ray:
            ray.shutdown()
