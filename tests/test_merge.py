"""Seam merge, window planning and mask polygonization on synthetic fragments."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio.features
from affine import Affine

from pipeline.instances import Instance, from_tile_prediction
from pipeline.merge import candidate_pairs, merge_instances
from pipeline.polygonize import mask_to_geometry
from pipeline.windows import plan_windows, valid_region


def fragments(scene_mask: np.ndarray, label: int, tile: int, overlap: int, score=0.9) -> list[Instance]:
    """What a perfect model sees: each window's view of the object, as a cropped instance."""
    h, w = scene_mask.shape
    out = []
    for win in plan_windows(w, h, tile, overlap):
        c, r = int(win.col_off), int(win.row_off)
        view = np.zeros((tile, tile), dtype=bool)
        part = scene_mask[r:r + tile, c:c + tile]
        view[:part.shape[0], :part.shape[1]] = part
        out += from_tile_prediction(view[None].astype(np.float32), np.array([score]), np.array([label]),
                                    (c, r, tile, tile), valid_region(win, w, h), 0.5, 0.1)
    return out


def paste(inst: Instance, shape: tuple[int, int]) -> np.ndarray:
    full = np.zeros(shape, dtype=bool)
    h, w = inst.mask.shape
    full[inst.row:inst.row + h, inst.col:inst.col + w] = inst.mask
    return full


@pytest.mark.parametrize("tile,overlap", [(64, 16), (50, 10), (64, 4)])
def test_fragments_of_each_object_become_exactly_one(tile, overlap):
    shape = (150, 170)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    stride = tile - overlap
    objects = [
        (abs(yy - stride - overlap / 2) < 25) & (abs(xx - stride - overlap / 2) < 25),  # four-window corner
        (np.hypot(yy - 110, xx - 60) < 18) & (np.hypot(yy - 110, xx - 60) >= 7),  # ring with a hole
        ((yy >= 10) & (yy < 20) & (xx >= 120) & (xx < 135)) | ((yy >= 10) & (yy < 20) & (xx >= 140) & (xx < 168)),
    ]
    instances = []
    for i, obj in enumerate(objects):
        instances += fragments(obj, label=1 + (i == 1), tile=tile, overlap=overlap)
    merged = merge_instances(instances, 0.5, 0.8)
    assert len(merged) == len(objects)
    for obj in objects:
        matches = [m for m in merged if (paste(m, shape) & obj).any()]
        assert len(matches) == 1 and np.array_equal(paste(matches[0], shape), obj)


def test_neighbours_two_pixels_apart_and_other_classes_stay_separate():
    shape = (100, 120)
    a = np.zeros(shape, dtype=bool)
    b = np.zeros(shape, dtype=bool)
    a[20:50, 30:56] = True
    b[20:50, 58:90] = True  # 2 px gap, straddling the seam between windows at 0 and 48
    merged = merge_instances(fragments(a, 1, 64, 16) + fragments(b, 1, 64, 16), 0.5, 0.8)
    assert len(merged) == 2
    same_place = fragments(a, 1, 64, 16) + fragments(a, 2, 64, 16)
    assert len(merge_instances(same_place, 0.5, 0.8)) == 2


def test_duplicates_in_one_window_merge_with_the_highest_score():
    mask = np.ones((10, 10), dtype=bool)
    a = Instance(row=5, col=5, mask=mask, score=0.6, label=1, window=(0, 0, 64, 64))
    b = Instance(row=6, col=5, mask=mask, score=0.9, label=1, window=(0, 0, 64, 64))
    (merged,) = merge_instances([a, b], 0.5, 0.8)
    assert merged.score == 0.9 and merged.mask.shape == (11, 10)


def test_candidate_pairs_use_the_index_not_all_pairs():
    rng = np.random.default_rng(0)
    instances = [Instance(row=int(r), col=int(c), mask=np.ones((5, 5), dtype=bool), score=0.5, label=1,
                          window=(0, 0, 10_000, 10_000)) for r, c in rng.integers(0, 10_000, (5000, 2))]
    pairs = candidate_pairs(instances)
    assert len(pairs) < 200  # sparse objects: a handful of touching boxes, not 12.5 million pairs
    for i, j in pairs:
        a, b = instances[i].box, instances[j].box
        assert min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_windows_cover_the_scene_full_size_with_edge_shift():
    windows = plan_windows(300, 130, 128, 32)
    assert {(w.width, w.height) for w in windows} == {(128, 128)}
    assert sorted({int(w.col_off) for w in windows}) == [0, 96, 172]
    assert sorted({int(w.row_off) for w in windows}) == [0, 2]
    covered = np.zeros((130, 300), dtype=int)
    for w in windows:
        covered[int(w.row_off):int(w.row_off) + 128, int(w.col_off):int(w.col_off) + 128] += 1
    assert covered.min() >= 1
    (small,) = plan_windows(50, 40, 128, 32)
    assert (small.col_off, small.row_off, small.width) == (0, 0, 128)
    assert valid_region(small, 50, 40).sum() == 50 * 40


def test_padding_never_yields_objects():
    (win,) = plan_windows(50, 40, 64, 8)
    everywhere = np.ones((1, 64, 64), dtype=np.float32)
    (inst,) = from_tile_prediction(everywhere, np.array([0.9]), np.array([1]), (0, 0, 64, 64),
                                   valid_region(win, 50, 40), 0.5, 0.5)
    assert inst.mask.shape == (40, 50)


@pytest.mark.parametrize("transform", [Affine(0.5, 0, 1000, 0, -0.5, 2000), Affine(1e-5, 0, -84.0, 0, -1e-5, 33.0),
                                       Affine(0.4, 0.1, 10, 0.1, -0.4, 50)])
def test_polygon_burns_back_onto_exactly_the_mask(transform):
    rng = np.random.default_rng(3)
    mask = rng.random((30, 40)) > 0.55  # ragged: holes, many parts, diagonal contacts
    mask[5:25, 5:35] |= True
    mask[12:16, 15:20] = False  # a hole
    geom = mask_to_geometry(mask, 7, 11, transform)
    assert geom.is_valid
    burned = rasterio.features.rasterize([geom], out_shape=(37, 51), transform=transform).astype(bool)
    assert np.array_equal(burned[7:, 11:], mask) and not burned[:7].any() and not burned[:, :11].any()
