"""COCO evaluation with pycocotools: real predictions, masks as RLE, bbox and segm AP."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import load_checkpoint
from core.cluster import check_gpus
from model.dataset import CocoTiles, collate
from core.errors import UserError
from core.files import atomic_path

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6]; -1 = no objects of that size


def predictions_to_coco(outputs: list[dict[str, torch.Tensor]], image_ids: list[int],
                        category_ids: list[int], mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """torchvision Mask R-CNN outputs -> COCO result records (bbox x, y, w, h; segmentation RLE).

    `category_ids[label - 1]` is the file's category id of model label `label`."""
    results = []
    for out, image_id in zip(outputs, image_ids):
        masks = (out["masks"][:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)
        boxes = out["boxes"].cpu().numpy()
        for box, label, score, mask in zip(boxes, out["labels"].tolist(), out["scores"].tolist(), masks):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({"image_id": int(image_id), "category_id": int(category_ids[label - 1]),
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score), "segmentation": rle})
    return results


def coco_evaluate(ground_truth: str | Path | dict[str, Any], results: list[dict[str, Any]]) -> dict[str, dict]:
    """{"bbox": {"AP": ..}, "segm": {..}} from COCOeval; no detections at all give AP 0."""
    gt_data = json.loads(Path(ground_truth).read_text()) if not isinstance(ground_truth, dict) else ground_truth
    metrics: dict[str, dict[str, float]] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"info": {}, **gt_data}
        gt.createIndex()
        for iou_type in ("bbox", "segm"):
            if not results or not gt.getAnnIds():
                metrics[iou_type] = {name: 0.0 for name in STAT_NAMES}
                continue
            dt = gt.loadRes(results)
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            metrics[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats[:6])}
    return metrics


def evaluate_model(model: torch.nn.Module, dataset: CocoTiles, device: str | torch.device, batch_size: int = 2,
                   mask_threshold: float = 0.5, progress: bool = True) -> tuple[dict[str, dict], float]:
    """(metrics, seconds per tile of model forward) of `model` on `dataset` against its annotations."""
    device = torch.device(device)
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    category_ids = sorted(dataset.label_of, key=dataset.label_of.get)
    results: list[dict[str, Any]] = []
    seconds = 0.0
    with torch.inference_mode():
        for images, targets in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
            t = time.perf_counter()
            outputs = model([img.to(device) for img in images])
            seconds += time.perf_counter() - t
            results += predictions_to_coco(outputs, [t["image_id"] for t in targets], category_ids, mask_threshold)
    gt = json.loads((dataset.root / "annotations.json").read_text())
    return coco_evaluate(gt, results), seconds / max(len(dataset), 1)


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    lines = [f"{'':6}" + "".join(f"{name:>8}" for name in STAT_NAMES)]
    for iou_type in ("bbox", "segm"):
        lines.append(f"{iou_type:6}" + "".join(f"{metrics[iou_type][n]:8.3f}" for n in STAT_NAMES))
    return "\n".join(lines)


def evaluate_checkpoint(checkpoint: str | Path, data: Path, device: str, batch_size: int, out: Path) -> dict:
    """`python -m pipeline evaluate`: print the AP table and save it as JSON."""
    check_gpus(device)
    model, payload = load_checkpoint(checkpoint)
    dataset = CocoTiles(data)
    if dataset.class_names != payload["class_names"]:
        raise UserError(f"{data}: categories {dataset.class_names} differ from the checkpoint's "
                        f"{payload['class_names']}")
    metrics, seconds = evaluate_model(model.to(device), dataset, device, batch_size)
    print(format_table(metrics))
    print(f"(-1: no objects of that size; {len(dataset)} tiles, {seconds:.3f} s per tile)")
    report = {"checkpoint": str(checkpoint), "data": str(data), "tiles": len(dataset),
              "seconds_per_tile": seconds, **metrics}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report
