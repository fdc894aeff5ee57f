"""Training loop in the spirit of torchvision's detection references, made resumable and deterministic.

Determinism: the tile order of epoch e is a permutation drawn from `seed + e`, each sample's augmentation
from (seed, epoch, index), and torch's global RNG (RPN/RoI sampling, drop-path) is reseeded at every
iteration from (seed, iteration, rank); so a run resumed from a checkpoint sees exactly the batches and
draws the uninterrupted run would have seen.

The pieces (plan, session, batches, step, loop) are shared with data-parallel training (model/distributed.py):
there each Ray Train worker runs `run_loop` around a DistributedDataParallel model.
"""

from __future__ import annotations

import csv
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.augment import aerial_augmentations
from model.builder import build_model
from model.checkpoint import (check_compatible, read_checkpoint, read_checkpoint_header, read_train_state, save_training,
                              train_state_path)
from core.cluster import check_gpus
from model.dataset import CocoTiles, collate
from core.errors import UserError
from model.evaluate import evaluate_model
from core.files import check_writable
from model.optim import build_optimizer, build_scheduler

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
LOG_FIELDS = ["iteration", "epoch", "lr", "loss", *LOSS_NAMES, "seconds"]


@dataclass
class TrainOptions:
    data: Path  # a `prepare` output: data/train (and optionally data/val)
    out: Path  # checkpoint path; losses go beside it
    iters: int | None = None
    epochs: int | None = None
    batch_size: int | None = None  # per process; None: the config's train.batch_size
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    validate: bool = False  # COCO AP on data/val after each epoch (or every `validate_every` iterations)
    progress: bool = True
    # Iterations between validations / between checkpoints; None: at the end of each epoch. The last
    # iteration always does both. A tiny data set has epochs of a few iterations: validating and writing
    # 570 MB (Swin-T with AdamW's state) that often would cost more than the training.
    validate_every: int | None = None
    checkpoint_every: int | None = None


@dataclass(frozen=True)
class Plan:
    """What every process of a run agrees on, made and checked once before any model is built."""

    config: dict[str, Any]  # with the data's class names
    batch_size: int  # images per process and iteration
    workers: int
    epoch_len: int  # iterations per epoch
    total: int  # iterations of the whole run
    start: int  # the iteration a --resume continues from (0: a fresh run)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.workers

    @property
    def class_names(self) -> list[str]:
        return list(self.config["classes"])


@dataclass
class Session:
    """One process's trainable state: what a checkpoint saves and the loop advances."""

    model: nn.Module  # the plain model; DDP, when used, only wraps it for the forward
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    device: torch.device


class AugmentedTiles(Dataset):
    """Applies seeded augmentations: sample i of epoch e always gets the same flips and rotation."""

    def __init__(self, tiles: CocoTiles, seed: int):
        self.tiles, self.seed, self.epoch = tiles, seed, 0
        self.augment = aerial_augmentations()

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int):
        image, target = self.tiles[index]
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index)
        return self.augment(image, target, generator)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def shard_order(order: list[int], workers: int, rank: int, batch_size: int) -> list[int]:
    """This rank's tiles of an epoch: the rank-th slice of `batch_size` of every global batch of
    workers x batch_size, so the global batch of an iteration is the batch one process would take.

    With several workers the order is first padded cyclically to whole global batches: every rank needs a
    full batch to step with the others (a single process simply takes a shorter last batch).
    """
    if workers == 1:
        return order
    size = workers * batch_size
    padded = [order[i % len(order)] for i in range(math.ceil(len(order) / size) * size)]
    return [t for first in range(rank * batch_size, len(padded), size) for t in padded[first:first + batch_size]]


def losses_path(out: Path) -> Path:
    return out.with_name(out.stem + ".losses.csv")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_iteration(seed: int, iteration: int, rank: int) -> None:
    """RPN/RoI sampling and drop-path draw from torch's global RNG: seeding it per iteration and rank makes a
    resumed run draw what the uninterrupted one did, with no RNG state to carry in the checkpoint."""
    torch.manual_seed(((seed * 1_000_003 + iteration) * 1_009 + rank) % 2**63)


def plan_training(config: dict[str, Any], options: TrainOptions, workers: int = 1) -> Plan:
    """Check the data, the run length and a --resume against its checkpoint; refuse bad input in one line."""
    tiles = CocoTiles(options.data / "train")
    if len(tiles) == 0:
        raise UserError(f"{options.data / 'train'}: no training tiles")
    class_names = tiles.class_names
    if config["classes"] is not None and list(config["classes"]) != class_names:
        raise UserError(f"config classes {config['classes']} differ from the data's categories {class_names}")
    config = {**config, "classes": class_names}
    check_writable(options.out, overwrite=True)  # before any work, not at the first checkpoint

    batch_size = int(options.batch_size or config["train"]["batch_size"])
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    epoch_len = math.ceil(len(tiles) / (batch_size * workers))
    if options.iters is None and options.epochs is None:
        raise UserError("give --iters or --epochs")
    total = int(options.iters) if options.iters is not None else int(options.epochs) * epoch_len
    if total < 1:
        raise UserError("--iters / --epochs must be at least 1")
    for name in ("validate_every", "checkpoint_every"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    start = resume_point(config, options, total, batch_size * workers)
    return Plan(config, batch_size, workers, epoch_len, total, start)


def resume_point(config: dict[str, Any], options: TrainOptions, total: int, global_batch: int) -> int:
    """0 for a fresh run; for --resume, the iteration of the training state beside the weights at --out, once
    sure it belongs to them and continues this very run.

    The global batch (workers x batch size) must match, the worker count need not: 2 x 1 continues 1 x 2.
    """
    if not options.resume:
        return 0
    if not options.out.exists():
        raise UserError(f"{options.out}: nothing to resume (no checkpoint there yet)")
    check_compatible(read_checkpoint_header(options.out), config, options.out)
    state = read_train_state(options.out)
    saved_batch = state.get("global_batch", state.get("batch_size"))
    if (state.get("total_iters"), state.get("seed"), saved_batch) != (total, options.seed, global_batch):
        raise UserError(f"{options.out}: checkpoint was trained for {state.get('total_iters')} iterations with seed "
                        f"{state.get('seed')} and a global batch of {saved_batch}; resume with the same "
                        f"--iters/--epochs, --seed and workers x --batch-size (here {global_batch})")
    return int(state["iteration"])


def build_session(plan: Plan, options: TrainOptions, device: torch.device) -> Session:
    """Model, optimizer (lr scaled to the global batch), schedule and AMP scaler; a --resume loads them all."""
    seed_everything(options.seed)
    config = plan.config
    model = build_model(config, num_classes=len(plan.class_names)).to(device)
    optimizer = build_optimizer(model, config, plan.global_batch)
    scheduler = build_scheduler(optimizer, config, plan.total)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and bool(config["model"]["amp"]))
    if options.resume:
        state = read_train_state(options.out)
        model.load_state_dict(read_checkpoint(options.out)["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
    return Session(model, optimizer, scheduler, scaler, device)


def training_state(session: Session, plan: Plan, seed: int, iteration: int) -> dict[str, Any]:
    """Everything --resume needs besides the weights: the content of OUT.train-state.pt."""
    state = {"iteration": iteration, "total_iters": plan.total, "seed": seed, "batch_size": plan.batch_size,
             "workers": plan.workers, "global_batch": plan.global_batch,
             "optimizer": session.optimizer.state_dict(), "scheduler": session.scheduler.state_dict()}
    if session.scaler.is_enabled():
        state["scaler"] = session.scaler.state_dict()
    return state


def batches(data: AugmentedTiles, plan: Plan, seed: int, rank: int,
            num_workers: int) -> Iterator[tuple[int, int, tuple, tuple]]:
    """(iteration, epoch, images, targets) from plan.start on: this rank's part of each global batch."""
    iteration = plan.start
    while iteration < plan.total:
        epoch, offset = divmod(iteration, plan.epoch_len)
        data.epoch = epoch
        order = shard_order(epoch_order(len(data), seed, epoch), plan.workers, rank, plan.batch_size)
        loader = DataLoader(data, batch_size=plan.batch_size, sampler=order[offset * plan.batch_size:],
                            collate_fn=collate, num_workers=num_workers,
                            generator=torch.Generator())  # keep the global RNG for the model only
        for images, targets in loader:
            yield iteration, epoch, images, targets
            iteration += 1
            if iteration >= plan.total:
                return


def train_step(forward: nn.Module, session: Session, images: tuple, targets: tuple, clip: float,
               iteration: int) -> tuple[dict[str, torch.Tensor], float]:
    """One optimizer step; returns this process's losses and the lr used. `forward` is the model, or DDP
    around it, whose backward averages the gradients over the workers before the clip and the step."""
    device = session.device
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    loss_dict = forward(images, targets)
    loss = sum(loss_dict.values())
    if not torch.isfinite(loss):
        raise UserError(f"loss became {loss.item()} at iteration {iteration}: lower optimizer.lr "
                        "or check the annotations")
    optimizer, scaler = session.optimizer, session.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(session.model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]
    session.scheduler.step()
    return loss_dict, lr


class LossLog:
    """OUT.losses.csv, one row per iteration. It starts with the rows of the iterations the run resumes from
    (none for a fresh run), so no iteration is lost or logged twice."""

    def __init__(self, path: Path, start: int):
        kept = []
        if path.exists():
            with path.open() as f:
                kept = [r for r in csv.DictReader(f) if int(r["iteration"]) <= start]
        self.file = path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=LOG_FIELDS, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(kept)
        self.file.flush()

    def write(self, row: dict[str, Any]) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ProgressBar:
    """tqdm bar with the smoothed loss, the lr and the last validation's AP50; called with each iteration's row."""

    def __init__(self, plan: Plan, enabled: bool):
        self.bar = tqdm(total=plan.total, initial=plan.start, desc="train", unit="it", disable=not enabled)
        self.smoothed: float | None = None
        self.ap50: dict[str, str] = {}

    def __call__(self, row: dict[str, Any]) -> bool:
        self.smoothed = row["loss"] if self.smoothed is None else 0.9 * self.smoothed + 0.1 * row["loss"]
        if "val" in row:
            self.ap50 = {f"{kind}_AP50": f"{row['val'][kind]['AP50']:.3f}" for kind in ("bbox", "segm")}
        self.bar.set_postfix(loss=f"{self.smoothed:.3f}", lr=f"{row['lr']:.2e}", **self.ap50)
        self.bar.update(1)
        return False  # never asks to stop: Ctrl-C is a KeyboardInterrupt here

    def close(self) -> None:
        self.bar.close()


def due(iteration: int, every: int | None, plan: Plan) -> bool:
    """Is a validation or checkpoint taken every `every` iterations (None: each epoch) due after `iteration`?"""
    return iteration % (every or plan.epoch_len) == 0 or iteration == plan.total


def run_loop(session: Session, plan: Plan, options: TrainOptions, *, forward: nn.Module | None = None,
             rank: int = 0, mean: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             report: Callable[[dict[str, Any]], bool] = lambda row: False) -> dict[str, Any]:
    """Train from plan.start to plan.total; returns the summary (iterations, losses, timings, val AP, and the
    history: every iteration's row and every validation, each with the training seconds it took to get there).

    Rank 0 logs the losses, validates (`options.validate`) and writes the checkpoint, weights and training
    state (each epoch or `options.*_every` iterations, at the end, on KeyboardInterrupt).
    `mean` averages a tensor over the processes; each row holds those means. `report` shows rank 0's row
    (with the validation's metrics under "val" when one was just made) and may ask to stop: the request
    travels with the next iteration's mean, so every rank stops after the same iteration, and the run ends
    with a checkpoint there.
    """
    forward = forward or session.model
    data = AugmentedTiles(CocoTiles(options.data / "train"), options.seed)
    clip = float(plan.config["train"]["clip_grad_norm"] or 0)
    log = LossLog(losses_path(options.out), plan.start) if rank == 0 else None
    val_tiles = options.data / "val"
    validate = options.validate and rank == 0 and (val_tiles / "annotations.json").exists()
    history: list[dict[str, Any]] = []
    val_metrics: list[dict[str, Any]] = []
    iteration, stop_request = plan.start, False
    trained = 0.0  # seconds of optimizer steps since plan.start: the clock of the curves, validation excluded

    def checkpoint() -> None:
        if rank == 0:
            save_training(options.out, session.model, plan.config, plan.class_names,
                          training_state(session, plan, options.seed, iteration))

    t_start = time.perf_counter()
    try:
        session.model.train()
        num_workers = int(plan.config["train"]["num_workers"])
        for it, epoch, images, targets in batches(data, plan, options.seed, rank, num_workers):
            seed_iteration(options.seed, it, rank)
            t0 = time.perf_counter()
            losses, lr = train_step(forward, session, images, targets, clip, it)
            flag = torch.tensor(float(stop_request), device=session.device)
            means = mean(torch.stack([*(losses[k].detach().float() for k in LOSS_NAMES), flag])).tolist()
            iteration = it + 1
            row = {"iteration": iteration, "epoch": epoch, "lr": lr, "loss": sum(means[:-1]),
                   **dict(zip(LOSS_NAMES, means)), "seconds": time.perf_counter() - t0}
            history.append(row)
            trained += row["seconds"]
            if validate and due(iteration, options.validate_every, plan):
                metrics, _ = evaluate_model(session.model, CocoTiles(val_tiles), session.device, plan.batch_size,
                                            progress=False)
                val_metrics.append({"iteration": iteration, "seconds": trained, **metrics})
                session.model.train()
                row = {**row, "val": metrics}
            if log is not None:
                log.write(row)
                stop_request = report(row)
            if means[-1] > 0:  # some rank was asked to stop: all stop here
                checkpoint()
                break
            if due(iteration, options.checkpoint_every, plan):
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        raise
    finally:
        if log is not None:
            log.close()
    seconds = time.perf_counter() - t_start
    return {
        "iterations": plan.total,
        "resumed_from": plan.start,
        "seconds_per_iter": seconds / max(len(history), 1),
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "losses_csv": str(losses_path(options.out)),
        "checkpoint": str(options.out),
        "train_state": str(train_state_path(options.out)),
        "val": val_metrics,
        "history": history,
    }


def train(config: dict[str, Any], options: TrainOptions,
          stop_when: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Train Mask R-CNN on COCO tiles in this process; returns a summary (iterations, losses, timings, val AP,
    history). `stop_when(row)` may end the run early (after the next iteration, with a checkpoint), e.g. once
    a validation (row["val"]) reaches a target."""
    check_gpus(options.device)
    device = torch.device(options.device)
    plan = plan_training(config, options)
    session = build_session(plan, options, device)
    bar = ProgressBar(plan, options.progress)

    def report(row: dict[str, Any]) -> bool:
        return bar(row) or (stop_when is not None and stop_when(row))

    try:
        return run_loop(session, plan, options, report=report)
    finally:
        bar.close()
