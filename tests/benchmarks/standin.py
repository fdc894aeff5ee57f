"""A stand-in for a GPU model: a fixed time per tile and realistic dense output, at almost no host CPU.

`object_scene` writes a scene of building-sized objects (each object's id in bands 1-2, high and low byte;
its class in band 3). `StandIn` knows the objects' layout (it rebuilds it from the same seeds), finds where a
tile lies from one object near its centre, and returns every object the tile shows, either in torchvision
Mask R-CNN's format (a float mask of the whole tile per detection) or in the compact form (a boolean mask
cropped to each object). It then sleeps for the rest of its time per tile: a forward on a GPU takes wall time
but no host CPU. Its own CPU seconds are logged, so a benchmark can tell them from the pipeline's, and so are
the wall times each call starts and ends, so it can tell when the model waited.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

SPACING = 75  # px between object centres: ~46 objects per 512 px tile


@dataclass(frozen=True)
class Layout:
    """The objects of one scene: ids, classes, boxes (row0, col0, row1, col1) and masks cropped to them."""

    ids: np.ndarray
    classes: np.ndarray
    boxes: np.ndarray
    masks: list[np.ndarray]


def layout(size: int, seed: int, first_id: int) -> Layout:
    """Objects 14-40 px (rectangles and ellipses, two classes) on a jittered grid, never touching."""
    rng = np.random.default_rng(seed)
    ids, classes, boxes, masks = [], [], [], []
    for cy in range(SPACING // 2, size, SPACING):
        for cx in range(SPACING // 2, size, SPACING):
            h, w = (int(v) for v in rng.integers(14, 41, 2))
            y0 = int(np.clip(cy + rng.integers(-12, 13) - h // 2, 0, size - h))
            x0 = int(np.clip(cx + rng.integers(-12, 13) - w // 2, 0, size - w))
            yy, xx = np.mgrid[0:h, 0:w]
            ellipse = ((yy - (h - 1) / 2) / (h / 2)) ** 2 + ((xx - (w - 1) / 2) / (w / 2)) ** 2 <= 1
            masks.append(np.ones((h, w), bool) if rng.random() < 0.5 else ellipse)
            classes.append(1 + int(rng.random() < 0.3))
            ids.append(first_id + len(ids))
            boxes.append((y0, x0, y0 + h, x0 + w))
    assert ids[-1] < 65536
    return Layout(np.array(ids), np.array(classes), np.array(boxes), masks)


def object_scene(path: Path, size: int, seed: int, first_id: int = 1) -> Path:
    if path.exists():
        return path
    objects = layout(size, seed, first_id)
    ids = np.zeros((size, size), dtype=np.int32)
    classes = np.zeros((size, size), dtype=np.uint8)
    for object_id, cls, (r0, c0, r1, c1), mask in zip(objects.ids, objects.classes, objects.boxes, objects.masks):
        ids[r0:r1, c0:c1][mask] = object_id
        classes[r0:r1, c0:c1][mask] = cls
    tmp = path.with_suffix(".partial.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32616", transform=Affine(0.3, 0, 500000 + seed * 2000, 0, -0.3, 4000000),
                       tiled=True, blockxsize=512, blockysize=512, compress="deflate") as dst:
        dst.write(np.stack([ids >> 8, ids & 255, classes]).astype(np.uint8))
    tmp.rename(path)
    return path


class StandIn:
    """Picklable predictor following `run_scene`'s contract; `compact=False` gives torchvision's format.

    `scenes`: (size, seed, first_id) of every `object_scene` it will see."""

    class_names = ["building", "shed"]

    def __init__(self, seconds_per_tile: float, compact: bool, log_dir: str, scenes: list[tuple[int, int, int]]):
        self.seconds, self.compact, self.log_dir, self.scenes = seconds_per_tile, compact, log_dir, scenes
        self._objects: dict[int, tuple[Layout, int]] | None = None

    def __getstate__(self):
        return {**self.__dict__, "_objects": None}

    def load(self) -> None:
        """Built when the worker starts, as a model is loaded (`TileWorker` calls it), not on the first tile."""
        self.objects()

    def objects(self) -> dict[int, tuple[Layout, int]]:
        """object id -> (its scene's layout, its index there)."""
        if self._objects is None:
            self._objects = {}
            for size, seed, first_id in self.scenes:
                scene = layout(size, seed, first_id)
                self._objects.update({int(i): (scene, k) for k, i in enumerate(scene.ids)})
        return self._objects

    def __call__(self, images):
        begin, start, cpu = time.time(), time.perf_counter(), time.thread_time()
        outputs = [self.detect(image) for image in images]
        used = time.thread_time() - cpu
        time.sleep(max(0.0, self.seconds * len(images) - (time.perf_counter() - start)))
        with open(Path(self.log_dir) / f"{os.getpid()}.cpu", "a") as log:  # CPU s, tiles, wall start and end
            log.write(f"{used} {len(images)} {begin} {time.time()}\n")
        return outputs

    def detect(self, image):
        import torch

        height, width = image.shape[1:]
        values = np.rint(image[:2].numpy() * 255).astype(np.int32)
        ids = values[0] * 256 + values[1]
        # An object near the tile's centre lies wholly in the tile: its first pixel is its mask's first pixel,
        # which places the tile in the scene.
        centre = ids[height // 2 - 64:height // 2 + 64, width // 2 - 64:width // 2 + 64]
        anchor = int(centre.flat[np.flatnonzero(centre)[0]])
        scene, k = self.objects()[anchor]
        r, c = divmod(int(np.argmax(ids == anchor)), width)
        i, j = divmod(int(np.argmax(scene.masks[k])), scene.masks[k].shape[1])
        row0, col0 = scene.boxes[k][0] + i - r, scene.boxes[k][1] + j - c
        b = scene.boxes
        seen = np.flatnonzero((b[:, 0] < row0 + height) & (b[:, 2] > row0) & (b[:, 1] < col0 + width) & (b[:, 3] > col0))
        crops, mask_boxes, classes = [], [], []
        for n in seen:
            r0, c0, r1, c1 = (int(v) for v in b[n])
            top, left = max(r0, row0), max(c0, col0)
            crop = scene.masks[n][top - r0:min(r1, row0 + height) - r0, left - c0:min(c1, col0 + width) - c0]
            rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
            if rows.size == 0:
                continue
            crop = crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            y, x = top - row0 + rows[0], left - col0 + cols[0]
            crops.append(torch.from_numpy(np.ascontiguousarray(crop)))
            mask_boxes.append((x, y, x + crop.shape[1], y + crop.shape[0]))
            classes.append(int(scene.classes[n]))
        labels = torch.tensor(classes, dtype=torch.int64)
        boxes = torch.tensor(mask_boxes, dtype=torch.int64).reshape(-1, 4)
        scores = torch.full((len(crops),), 0.9)
        if self.compact:
            return {"boxes": boxes.float(), "labels": labels, "scores": scores, "mask_boxes": boxes,
                    "mask_crops": crops}
        masks = torch.zeros((len(crops), 1, height, width))
        for n, (crop, (x0, y0, x1, y1)) in enumerate(zip(crops, mask_boxes)):
            masks[n, 0, y0:y1, x0:x1] = crop
        return {"boxes": boxes.float(), "labels": labels, "scores": scores, "masks": masks}
