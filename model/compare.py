"""The backbone comparison: same data, schedule, seed and augmentation; only the backbone changes.

Writes a table (compare.md, compare.json) and a picture (compare.png): the training loss and the validation AP
of each backbone against iterations and against training seconds, so "does Swin help on my imagery" is
answered by the curves as well as by their end points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.checkpoint import load_checkpoint
from model.config import load_config
from model.curves import Curves, plot_curves
from model.dataset import CocoTiles
from model.evaluate import evaluate_model
from core.files import atomic_path
from model.train import TrainOptions, train

COLUMNS = ("backbone", "parameters", "train s/iter", "inference s/tile", "bbox AP", "segm AP")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], col: str) -> str:
        value = row[col]
        if col == "parameters":
            return f"{value / 1e6:.1f} M"
        if isinstance(value, float):
            return f"{value:.3f}" if "AP" in col else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row, c) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def compare(configs: list[str], data: Path, out_dir: Path, *, iters: int | None, epochs: int | None,
            batch_size: int | None, device: str, seed: int, validate_every: int | None = None) -> list[dict[str, Any]]:
    """Train and evaluate each config, validating each epoch (or every `validate_every` iterations); write
    out_dir/compare.md, compare.json and compare.png; return the rows."""
    loaded = [(Path(c), load_config(c)) for c in configs]  # refuse a bad config before hours of training
    out_dir.mkdir(parents=True, exist_ok=True)
    val = CocoTiles(data / "val")
    rows, curves = [], []
    for path, config in loaded:
        checkpoint = out_dir / f"{path.stem}.pt"
        print(f"== {path}: training ({config['model']['backbone']['name']})")
        summary = train(config, TrainOptions(data=data, out=checkpoint, iters=iters, epochs=epochs,
                                             batch_size=batch_size, device=device, seed=seed, validate=True,
                                             validate_every=validate_every))
        curves.append(Curves(path.stem, summary["history"], summary["val"]))
        model, _ = load_checkpoint(checkpoint)
        metrics, seconds_per_tile = evaluate_model(model.to(device), val, device, batch_size or 2)
        rows.append({
            "config": str(path),
            "backbone": config["model"]["backbone"]["name"],
            "parameters": sum(p.numel() for p in model.parameters()),
            "train s/iter": summary["seconds_per_iter"],
            "inference s/tile": seconds_per_tile,
            "bbox AP": metrics["bbox"]["AP"],
            "segm AP": metrics["segm"]["AP"],
            "first loss": summary["first_loss"],
            "last loss": summary["last_loss"],
            "metrics": metrics,
            "validations": summary["val"],  # the curve: iteration, training seconds, bbox and segm metrics
            "losses_csv": summary["losses_csv"],
            "checkpoint": str(checkpoint),
        })
    table = markdown_table(rows)
    facts = f"{data} ({len(val)} validation tiles); iterations: {summary['iterations']}, seed {seed}, device {device}"
    plot_curves(curves, out_dir / "compare.png", title=f"compare: {facts}")
    figure = ("\n\n![Training loss and validation AP of each backbone, against iterations and training seconds]"
              "(compare.png)\n")
    with atomic_path(out_dir / "compare.md") as tmp:
        tmp.write_text(f"Data: {facts}.\n\n" + table + figure)
    with atomic_path(out_dir / "compare.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=2))
    print(table)
    return rows
