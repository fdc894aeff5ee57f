"""Training loop in the spirit of torchvision's detection references, made resumable and deterministic.

Determinism: the tile order of epoch e is a permutation drawn from `seed + e`, and each sample's
augmentation from (seed, epoch, index); so a run resumed from a checkpoint sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import csv
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.augment import aerial_augmentations
from model.builder import build_model
from model.checkpoint import check_compatible, read_checkpoint, save_checkpoint
from model.dataset import CocoTiles, collate
from model.errors import UserError
from model.evaluate import evaluate_model
from model.optim import build_optimizer, build_scheduler

LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")


@dataclass
class TrainOptions:
    data: Path  # a `prepare` output: data/train (and optionally data/val)
    out: Path  # checkpoint path; losses go beside it
    iters: int | None = None
    epochs: int | None = None
    batch_size: int | None = None  # None: the config's train.batch_size
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    validate: bool = False  # COCO AP on data/val after each epoch
    progress: bool = True


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


def losses_path(out: Path) -> Path:
    return out.with_name(out.stem + ".losses.csv")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rewrite_log(path: Path, keep_until: int) -> None:
    """On resume, keep only rows the checkpoint covers, so no iteration is logged twice."""
    if not path.exists():
        return
    with path.open() as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if int(r["iteration"]) <= keep_until]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["iteration", "epoch", "lr", "loss", *LOSS_NAMES, "seconds"])
        writer.writeheader()
        writer.writerows(kept)


def train(config: dict[str, Any], options: TrainOptions) -> dict[str, Any]:
    """Train Mask R-CNN on COCO tiles; returns a summary (iterations, losses, timings, optional val AP)."""
    seed_everything(options.seed)
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    tiles = CocoTiles(options.data / "train")
    if len(tiles) == 0:
        raise UserError(f"{options.data / 'train'}: no training tiles")
    class_names = tiles.class_names
    if config["classes"] is not None and list(config["classes"]) != class_names:
        raise UserError(f"config classes {config['classes']} differ from the data's categories {class_names}")
    config = {**config, "classes": class_names}

    batch_size = int(options.batch_size or config["train"]["batch_size"])
    epoch_len = math.ceil(len(tiles) / batch_size)
    if options.iters is None and options.epochs is None:
        raise UserError("give --iters or --epochs")
    total = int(options.iters) if options.iters is not None else int(options.epochs) * epoch_len
    if total < 1:
        raise UserError("--iters / --epochs must be at least 1")

    model = build_model(config, num_classes=len(class_names)).to(device)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, total)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and bool(config["model"]["amp"]))
    log_path = losses_path(options.out)

    start = 0
    if options.resume and options.out.exists():
        payload = read_checkpoint(options.out)
        check_compatible(payload, config, options.out)
        state = payload.get("training_state") or {}
        if state.get("total_iters") != total or state.get("seed") != options.seed:
            raise UserError(f"{options.out}: checkpoint was trained for {state.get('total_iters')} iterations with "
                            f"seed {state.get('seed')}; resume with the same --iters/--epochs and --seed")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        start = int(state["iteration"])
        torch.set_rng_state(state["rng"])
        _rewrite_log(log_path, start)
    elif options.resume:
        raise UserError(f"{options.out}: nothing to resume (no checkpoint there yet)")
    elif log_path.exists():
        log_path.unlink()

    def checkpoint(iteration: int) -> None:
        state = {"iteration": iteration, "total_iters": total, "seed": options.seed, "batch_size": batch_size,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state()}  # RPN/RoI sampling and drop-path draw from it
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        save_checkpoint(options.out, model, config, class_names, training_state=state)

    data = AugmentedTiles(tiles, options.seed)
    clip = float(config["train"]["clip_grad_norm"] or 0)
    history: list[dict[str, float]] = []
    val_metrics: list[dict[str, Any]] = []
    iteration = start
    new_log = not log_path.exists()
    log_file = log_path.open("a", newline="")
    writer = csv.DictWriter(log_file, fieldnames=["iteration", "epoch", "lr", "loss", *LOSS_NAMES, "seconds"])
    if new_log:
        writer.writeheader()
    bar = tqdm(total=total, initial=start, desc="train", unit="it", disable=not options.progress)
    smoothed: float | None = None
    t_start = time.perf_counter()
    try:
        model.train()
        while iteration < total:
            epoch, offset = divmod(iteration, epoch_len)
            data.epoch = epoch
            order = epoch_order(len(tiles), options.seed, epoch)[offset * batch_size:]
            loader = DataLoader(data, batch_size=batch_size, sampler=order, collate_fn=collate,
                                num_workers=int(config["train"]["num_workers"]),
                                generator=torch.Generator())  # keep the global RNG for the model only
            for images, targets in loader:
                t0 = time.perf_counter()
                images = [img.to(device, non_blocking=True) for img in images]
                targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
                loss_dict = model(images, targets)
                loss = sum(loss_dict.values())
                if not torch.isfinite(loss):
                    raise UserError(f"loss became {loss.item()} at iteration {iteration}: lower optimizer.lr "
                                    "or check the annotations")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if clip > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(optimizer)
                scaler.update()
                lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                iteration += 1
                row = {"iteration": iteration, "epoch": epoch, "lr": lr, "loss": loss.item(),
                       **{k: loss_dict[k].item() for k in LOSS_NAMES}, "seconds": time.perf_counter() - t0}
                writer.writerow(row)
                log_file.flush()
                history.append(row)
                smoothed = row["loss"] if smoothed is None else 0.9 * smoothed + 0.1 * row["loss"]
                bar.set_postfix(loss=f"{smoothed:.3f}", lr=f"{lr:.2e}")
                bar.update(1)
                if iteration % epoch_len == 0 or iteration == total:
                    checkpoint(iteration)
                    if options.validate and (options.data / "val" / "annotations.json").exists():
                        metrics, _ = evaluate_model(model, CocoTiles(options.data / "val"), device, batch_size,
                                                    progress=False)
                        val_metrics.append({"iteration": iteration, **metrics})
                        model.train()
                if iteration >= total:
                    break
    except KeyboardInterrupt:
        checkpoint(iteration)
        bar.close()
        log_file.close()
        raise
    bar.close()
    log_file.close()
    seconds = time.perf_counter() - t_start
    return {
        "iterations": total,
        "resumed_from": start,
        "seconds_per_iter": seconds / max(len(history), 1),
        "first_loss": history[0]["loss"] if history else None,
        "last_loss": history[-1]["loss"] if history else None,
        "losses_csv": str(log_path),
        "checkpoint": str(options.out),
        "val": val_metrics,
    }
