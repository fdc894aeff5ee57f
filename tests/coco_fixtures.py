"""Tiny COCO tile sets written on the fly (no real data needed)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning


def write_png(path: Path, image: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="PNG", width=image.shape[2], height=image.shape[1], count=3,
                           dtype="uint8") as dst:
            dst.write(image)


def write_coco_tiles(root: Path, n_images: int = 4, size: int = 64, seed: int = 0) -> Path:
    """n_images tiles with 1-3 bright rectangles each (class 'box') on a dark noisy background."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        image = rng.integers(0, 60, (3, size, size), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(10, 24, 2))
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            image[:, y:y + h, x:x + w] = 220
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                "bbox": [x, y, w, h], "area": w * h,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
        name = f"tile_{i:03d}.png"
        write_png(root / "images" / name, image)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root
