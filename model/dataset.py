"""COCO-format tiles (annotations.json + images/) as a torchvision detection dataset."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from pycocotools import mask as mask_utils
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from torch.utils.data import Dataset

from core.errors import UserError


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """uint8 H x W mask of a COCO polygon list or RLE (compressed string or uncompressed counts)."""
    if isinstance(segmentation, list):
        rles = mask_utils.frPyObjects(segmentation, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()
               if isinstance(segmentation["counts"], str) else segmentation["counts"]}
    return mask_utils.decode(rle)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight x1, y1, x2, y2 boxes of N x H x W masks, in pixel-corner coordinates (x2 = last column + 1)."""
    boxes = torch.zeros((masks.shape[0], 4), dtype=torch.float32)
    for i, m in enumerate(masks):
        rows = torch.nonzero(m.any(dim=1)).flatten()
        cols = torch.nonzero(m.any(dim=0)).flatten()
        boxes[i] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
    return boxes


class CocoTiles(Dataset):
    """(image float32 3 x H x W in [0, 1], target) pairs; boxes come from the decoded masks."""

    def __init__(self, root: str | Path, transforms=None):
        self.root = Path(root)
        path = self.root / "annotations.json"
        if not path.is_file():
            raise UserError(f"{path}: not found (make tiles with `python -m pipeline prepare`)")
        try:
            coco = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from None
        try:
            self.images = sorted(coco["images"], key=lambda im: im["id"])
            categories = sorted(coco["categories"], key=lambda c: c["id"])
            annotations = coco["annotations"]
        except (KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a COCO file (missing {exc})") from None
        # Model labels are 1..K in category-id order, whatever ids the file uses.
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(categories)}
        self.class_names = [c["name"] for c in categories]
        self.by_image: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for ann in annotations:
            if ann["image_id"] in self.by_image and not ann.get("iscrowd", 0):
                self.by_image[ann["image_id"]].append(ann)
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, record: dict[str, Any]) -> torch.Tensor:
        path = self.root / "images" / record["file_name"]
        if not path.is_file():
            raise UserError(f"{path}: image listed in annotations.json is missing")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)  # a tile image has no map position
                with rasterio.open(path) as src:
                    data = src.read()
        except RasterioError as exc:
            raise UserError(f"{path}: unreadable tile image ({exc})") from None
        if data.shape[0] == 1:
            data = np.repeat(data, 3, axis=0)
        return torch.from_numpy(data[:3].astype(np.float32) / 255.0)

    def target(self, record: dict[str, Any]) -> dict[str, torch.Tensor]:
        h, w = int(record["height"]), int(record["width"])
        masks, labels = [], []
        for ann in self.by_image[record["id"]]:
            m = decode_segmentation(ann["segmentation"], h, w)
            if m.any():
                masks.append(m)
                labels.append(self.label_of[ann["category_id"]])
        mask_tensor = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        return {
            "boxes": masks_to_boxes(mask_tensor),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": mask_tensor,
            "image_id": int(record["id"]),
        }

    def __getitem__(self, index: int):
        record = self.images[index]
        image, target = self.read_image(record), self.target(record)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    return tuple(zip(*batch))
