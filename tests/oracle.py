"""A perfect 'model' for pipeline tests: synthetic scenes paint each object's id into band 1 and its class
into band 2, so a predictor can return exactly the true masks visible in each tile."""

from __future__ import annotations

import numpy as np
import rasterio
import torch
from affine import Affine
from rasterio.crs import CRS


class OraclePredictor:
    """Picklable predictor following the run_scene contract (float tiles in [0, 1] -> Mask R-CNN outputs)."""

    class_names = ["building", "tree"]

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        outputs = []
        for image in images:
            ids = torch.round(image[0] * 255).to(torch.int64)
            classes = torch.round(image[1] * 255).to(torch.int64)
            found = [int(v) for v in torch.unique(ids) if v > 0]
            h, w = ids.shape
            masks = torch.zeros(len(found), 1, h, w)
            boxes = torch.zeros(len(found), 4)
            labels = torch.zeros(len(found), dtype=torch.int64)
            for k, object_id in enumerate(found):
                m = ids == object_id
                masks[k, 0] = m.float()
                rows, cols = torch.nonzero(m, as_tuple=True)
                boxes[k] = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
                labels[k] = classes[m][0]
            outputs.append({"boxes": boxes, "labels": labels, "scores": torch.full((len(found),), 0.9),
                            "masks": masks})
        return outputs


def paint_objects(height: int, width: int, tile: int, overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, classes) rasters with objects across seams, at four-window corners, with holes, two parts,
    and two objects 2 px apart. Seams are where the windows of plan_windows meet."""
    ids = np.zeros((height, width), dtype=np.uint8)
    classes = np.zeros((height, width), dtype=np.uint8)
    stride = tile - overlap
    next_id = [1]

    def add(mask: np.ndarray, cls: int) -> None:
        ids[mask] = next_id[0]
        classes[mask] = cls
        next_id[0] += 1

    yy, xx = np.mgrid[0:height, 0:width]
    # A big object centred on the first four-window corner (larger than the overlap).
    c = stride + overlap // 2
    add((abs(yy - c) < 40) & (abs(xx - c) < 35), 1)
    # A ring with a hole across the first vertical seam, lower down.
    r = np.hypot(yy - (2 * stride + 20), xx - (stride + overlap // 2))
    add((r < 22) & (r >= 9), 2)
    # An L-shape across the first horizontal seam.
    lx, ly = 20, stride + overlap // 2
    add(((yy >= ly - 30) & (yy < ly + 30) & (xx >= lx) & (xx < lx + 12))
        | ((yy >= ly + 18) & (yy < ly + 30) & (xx >= lx) & (xx < lx + 45)), 1)
    # Two objects 2 px apart straddling a seam: must stay two.
    sx = 2 * stride + overlap // 2
    add((yy >= 15) & (yy < 40) & (xx >= sx - 20) & (xx < sx), 1)
    add((yy >= 15) & (yy < 40) & (xx >= sx + 2) & (xx < sx + 25), 1)
    # A two-part object (one instance with two pieces) inside one window.
    add(((yy >= 200) & (yy < 215) & (xx >= 10) & (xx < 30)) | ((yy >= 200) & (yy < 215) & (xx >= 34) & (xx < 50)), 2)
    # A small object touching the scene's right edge.
    add((yy >= 60) & (yy < 80) & (xx >= width - 15), 1)
    return ids, classes


def write_scene(path, ids: np.ndarray, classes: np.ndarray, crs: str, transform: Affine) -> None:
    height, width = ids.shape
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs=CRS.from_user_input(crs), transform=transform, tiled=True, blockxsize=64,
                       blockysize=64) as dst:
        dst.write(np.stack([ids, classes, np.full_like(ids, 200)]))
