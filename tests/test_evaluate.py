"""COCO tiles dataset, augmentations and pycocotools evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from model.augment import AerialAugment
from model.dataset import CocoTiles, masks_to_boxes
from model.evaluate import coco_evaluate, evaluate_model, predictions_to_coco
from tests.coco_fixtures import write_coco_tiles


@pytest.fixture
def tiles(tmp_path):
    root = write_coco_tiles(tmp_path / "val", n_images=3, size=64)
    # Add an RLE object with a hole to image 1.
    coco = json.loads((root / "annotations.json").read_text())
    ring = np.zeros((64, 64), dtype=np.uint8)
    ring[40:60, 40:60] = 1
    ring[46:54, 46:54] = 0
    rle = mask_utils.encode(np.asfortranarray(ring))
    coco["annotations"].append({"id": 999, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": int(ring.sum()),
                                "bbox": [40, 40, 20, 20], "segmentation": {"size": [64, 64],
                                                                           "counts": rle["counts"].decode()}})
    (root / "annotations.json").write_text(json.dumps(coco))
    return CocoTiles(root)


def ground_truth_outputs(dataset: CocoTiles) -> list[dict]:
    outputs = []
    for i in range(len(dataset)):
        _, target = dataset[i]
        n = len(target["labels"])
        outputs.append({"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(n),
                        "masks": target["masks"][:, None].float()})
    return outputs


def test_dataset_decodes_polygons_and_rle_with_holes(tiles):
    image, target = tiles[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    ring = target["masks"][-1]
    assert ring[50, 50] == 0 and ring[42, 42] == 1  # the hole survived
    assert target["boxes"][-1].tolist() == [40.0, 40.0, 60.0, 60.0]
    assert tiles.class_names == ["box"]


def test_ground_truth_as_predictions_scores_ap_one(tiles):
    outputs = ground_truth_outputs(tiles)
    ids = [im["id"] for im in tiles.images]
    metrics = coco_evaluate(tiles.root / "annotations.json", predictions_to_coco(outputs, ids, [1]))
    assert metrics["bbox"]["AP"] == pytest.approx(1.0)
    assert metrics["segm"]["AP"] == pytest.approx(1.0)


def test_wrong_and_empty_predictions_score_below_one(tiles):
    outputs = ground_truth_outputs(tiles)
    for out in outputs:
        out["masks"] = torch.roll(out["masks"], shifts=(7, 7), dims=(2, 3))
        out["boxes"] = out["boxes"] + 7
    ids = [im["id"] for im in tiles.images]
    metrics = coco_evaluate(tiles.root / "annotations.json", predictions_to_coco(outputs, ids, [1]))
    assert 0 <= metrics["segm"]["AP"] < 0.9 and metrics["bbox"]["AP"] < 0.9
    empty = coco_evaluate(tiles.root / "annotations.json", [])
    assert empty["bbox"]["AP"] == 0.0 and empty["segm"]["AP"] == 0.0


def test_evaluate_model_runs_a_model_over_the_tiles(tiles):
    class Perfect(torch.nn.Module):
        def __init__(self, dataset):
            super().__init__()
            self.by_shape = ground_truth_outputs(dataset)
            self.calls = 0

        def forward(self, images):
            out = self.by_shape[self.calls:self.calls + len(images)]
            self.calls += len(images)
            return out

    metrics, seconds = evaluate_model(Perfect(tiles), tiles, "cpu", batch_size=2, progress=False)
    assert metrics["segm"]["AP"] == pytest.approx(1.0) and seconds >= 0


def test_augmentations_move_image_masks_and_boxes_together():
    torch.manual_seed(0)
    augment = AerialAugment(p_flip=0.5, p_rotate=1.0)
    for seed in range(12):
        image = torch.zeros(3, 40, 64)
        masks = torch.zeros(2, 40, 64, dtype=torch.uint8)
        masks[0, 3:9, 5:20] = 1
        masks[1, 20:35, 50:60] = 1
        image[0, 3, 5] = 1.0  # a marked pixel inside object 0
        target = {"masks": masks, "boxes": masks_to_boxes(masks), "labels": torch.tensor([1, 1])}
        out_image, out = augment(image, target, torch.Generator().manual_seed(seed))
        assert torch.equal(out["boxes"], masks_to_boxes(out["masks"]))
        marked = torch.nonzero(out_image[0])[0]
        assert out["masks"][0][tuple(marked)] == 1
        assert out_image.shape[1:] == out["masks"].shape[1:]
        again, _ = augment(image, target, torch.Generator().manual_seed(seed))
        assert torch.equal(again, out_image)  # same seed, same augmentation
