"""Tile instances and the seam merge, on synthetic scenes seen by a perfect model; window planning."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.instances import Instance, from_tile_prediction
from pipeline.merge import candidate_pairs, merge_instances, settle_window
from pipeline.windows import axis_offsets, plan_windows, private_regions, valid_region


def perfect_model(objects: list[tuple[np.ndarray, int]], tile: int, overlap: int, seed: int = 0) -> list[Instance]:
    """What a perfect model reports tiling the scene: in each window, every object's part inside it (with a
    score that differs from window to window), through `from_tile_prediction` as the pipeline does."""
    rng = np.random.default_rng(seed)
    h, w = objects[0][0].shape
    out = []
    for win in plan_windows(w, h, tile, overlap):
        c, r = int(win.col_off), int(win.row_off)
        views = np.zeros((len(objects), tile, tile), dtype=np.float32)
        for k, (mask, _) in enumerate(objects):
            part = mask[r:r + tile, c:c + tile]
            views[k, :part.shape[0], :part.shape[1]] = part
        views[:, :, :] *= rng.uniform(0.6, 1.0)  # soft probabilities, all above the mask threshold
        out += from_tile_prediction(views, rng.uniform(0.5, 1.0, len(objects)), np.array([lab for _, lab in objects]),
                                    (c, r, tile, tile), valid_region(win, w, h), 0.5, 0.1)
    return out


def paste(inst: Instance, shape: tuple[int, int]) -> np.ndarray:
    full = np.zeros(shape, dtype=bool)
    h, w = inst.mask.shape
    full[inst.row:inst.row + h, inst.col:inst.col + w] = inst.mask
    return full


def fits_in_a_window(mask: np.ndarray, tile: int, overlap: int) -> bool:
    """A perfect model can tie an object's fragments together when one window holds all of it (a connected
    object needs nothing: its fragments chain through the overlaps)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return all(any(o <= lo and hi < o + tile for o in axis_offsets(n, tile, overlap))
               for lo, hi, n in ((rows[0], rows[-1], mask.shape[0]), (cols[0], cols[-1], mask.shape[1])))


def grown(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    return np.any([padded[dr:dr + h, dc:dc + w] for dr in range(3) for dc in range(3)], axis=0)


def synthetic_scene(shape: tuple[int, int], tile: int, overlap: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """Objects across seams: a rectangle at a four-window corner, a bar longer than a tile, then random
    rectangles, L-shapes, rings with a hole and two-part objects, never overlapping (gaps from 1 px)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    s, o = tile - overlap, overlap
    designed = [
        (abs(yy + 0.5 - s - o / 2) < 12) & (abs(xx + 0.5 - s - o / 2) < 12),  # four-window corner
        (yy >= shape[0] - 8) & (yy < shape[0] - 3) & (xx >= 2) & (xx < shape[1] - 2),  # spans every column
    ]
    objects = [(m, 1) for m in designed]
    taken = designed[0] | designed[1]
    kinds = ["rectangle", "L", "ring", "two parts"]
    attempts = 0
    while len(objects) < 40 and attempts < 2000:
        attempts += 1
        r, c = rng.integers(0, shape[0] - 30), rng.integers(0, shape[1] - 30)
        h, w = rng.integers(6, 30, 2)
        kind = kinds[len(objects) % len(kinds)]
        box = (yy >= r) & (yy < r + h) & (xx >= c) & (xx < c + w)
        if kind == "rectangle":
            mask = box
        elif kind == "L":
            mask = box & ((yy < r + max(h // 3, 2)) | (xx < c + max(w // 3, 2)))
        elif kind == "ring":
            d = np.hypot(yy - r - 12, xx - c - 12)
            mask = (d < 12) & (d >= 5)
        else:
            mask = box & ((xx < c + w // 2 - 1) | (xx >= c + w // 2 + 1)) if w >= 6 else box
            if not fits_in_a_window(mask, tile, overlap):
                continue
        if (grown(mask) & taken).any():  # keep at least a 1 px gap to every other object
            continue
        taken |= mask
        objects.append((mask, int(rng.integers(1, 3))))
    return objects


@pytest.mark.parametrize("tile,overlap,seed", [(64, 16, 0), (50, 10, 1), (64, 4, 2), (40, 12, 3), (64, 0, 4), (48, 0, 5)])
def test_every_object_comes_out_exactly_once_with_its_true_mask(tile, overlap, seed):
    shape = (180, 210)
    objects = synthetic_scene(shape, tile, overlap, seed)
    raw = perfect_model(objects, tile, overlap, seed)
    assert len(raw) > 1.3 * len(objects)  # many objects were cut by seams
    merged = merge_instances(raw, 0.5, 0.8)
    assert len(merged) == len(objects)
    for truth, label in objects:
        matches = [m for m in merged if (paste(m, shape) & truth).any()]
        assert len(matches) == 1
        (m,) = matches
        assert np.array_equal(paste(m, shape), truth) and m.label == label
        fragments = [f for f in raw if f.label == label and (paste(f, shape) & truth).any()]
        best = max(fragments, key=lambda f: f.score)
        assert m.score == best.score and m.window == best.window  # the highest score among its fragments
        assert m.mask[0].any() and m.mask[-1].any() and m.mask[:, 0].any() and m.mask[:, -1].any()  # tight


def test_four_window_corner_fragments_become_one():
    shape = (112, 112)
    obj = np.zeros(shape, dtype=bool)
    obj[40:72, 44:70] = True  # windows at 0 and 48 on both axes: every window sees a part
    raw = perfect_model([(obj, 1)], 64, 16)
    assert len(raw) == 4 and len({f.window for f in raw}) == 4
    (merged,) = merge_instances(raw, 0.5, 0.8)
    assert np.array_equal(paste(merged, shape), obj)


def test_fragments_with_low_whole_mask_iou_merge():
    shape = (64, 112)
    obj = np.zeros(shape, dtype=bool)
    obj[10:40, 40:100] = True  # windows at cols 0 and 48: 24 of 60 columns on the left
    left, right = perfect_model([(obj, 1)], 64, 16)
    inter = (paste(left, shape) & paste(right, shape)).sum()
    assert inter / (paste(left, shape) | paste(right, shape)).sum() < 0.3  # whole-mask IoU would keep two
    (merged,) = merge_instances([left, right], 0.5, 0.8)
    assert np.array_equal(paste(merged, shape), obj)


def test_masks_that_disagree_near_a_tile_edge_merge_by_intersection_over_the_smaller():
    # The left window's model stopped 4 px short of its edge: inside the shared columns 48..63 the masks
    # cover 12 and 16 columns (IoU 0.75, IoS 1.0).
    left = Instance(row=10, col=30, mask=np.ones((20, 30), dtype=bool), score=0.7, label=1, window=(0, 0, 64, 64))
    right = Instance(row=10, col=48, mask=np.ones((20, 30), dtype=bool), score=0.8, label=1, window=(48, 0, 64, 64))
    assert len(merge_instances([left, right], 0.9, 0.8)) == 1
    # Shifted right by 4: they share 8 of their 12 columns there (IoU 0.5, IoS 0.67).
    shifted = Instance(row=10, col=52, mask=np.ones((20, 12), dtype=bool), score=0.8, label=1, window=(48, 0, 64, 64))
    assert len(merge_instances([left, shifted], 0.6, 0.8)) == 2
    assert len(merge_instances([left, shifted], 0.5, 0.8)) == 1
    assert len(merge_instances([left, shifted], 0.6, 0.6)) == 1


def test_neighbours_two_pixels_apart_across_a_seam_stay_two():
    shape = (100, 120)
    a = np.zeros(shape, dtype=bool)
    b = np.zeros(shape, dtype=bool)
    a[20:50, 30:56] = True
    b[20:50, 58:90] = True  # 2 px gap, both straddling the overlap of the windows at 0 and 48
    merged = merge_instances(perfect_model([(a, 1), (b, 1)], 64, 16), 0.5, 0.8)
    assert len(merged) == 2
    assert sorted(m.mask.sum() for m in merged) == sorted([a.sum(), b.sum()])
    touching = np.zeros(shape, dtype=bool)
    touching[20:50, 56:90] = True  # no gap at all: still two objects, their masks are disjoint
    assert len(merge_instances(perfect_model([(a, 1), (touching, 1)], 64, 16), 0.5, 0.8)) == 2


def test_without_overlap_fragments_join_across_the_seam_line_and_neighbours_stay_apart():
    shape = (64, 128)  # windows at cols 0 and 64 abut along the seam between columns 63 and 64
    cut = np.zeros(shape, dtype=bool)
    cut[10:30, 50:80] = True
    (merged,) = merge_instances(perfect_model([(cut, 1)], 64, 0), 0.5, 0.8)
    assert np.array_equal(paste(merged, shape), cut)
    facing_left, facing_right = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    facing_left[10:30, 40:63] = True  # ends one pixel before the seam
    facing_right[10:30, 64:90] = True  # starts right at it
    assert len(merge_instances(perfect_model([(facing_left, 1), (facing_right, 1)], 64, 0), 0.5, 0.8)) == 2
    offset_left, offset_right = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    offset_left[5:20, 40:64] = True  # both touch the seam, at different rows
    offset_right[22:40, 64:90] = True
    assert len(merge_instances(perfect_model([(offset_left, 1), (offset_right, 1)], 64, 0), 0.5, 0.8)) == 2


def test_without_overlap_a_four_window_corner_object_becomes_one():
    shape = (128, 128)
    obj = np.zeros(shape, dtype=bool)
    obj[50:80, 54:70] = True
    raw = perfect_model([(obj, 1)], 64, 0)
    assert len(raw) == 4
    (merged,) = merge_instances(raw, 0.5, 0.8)
    assert np.array_equal(paste(merged, shape), obj)


def signature(inst: Instance) -> tuple:
    return inst.box, inst.mask.tobytes(), inst.score, inst.label, inst.window


@pytest.mark.parametrize("tile,overlap,seed", [(64, 16, 0), (50, 10, 1), (64, 0, 4), (40, 12, 3)])
def test_settling_each_window_early_gives_exactly_the_scene_merge(tile, overlap, seed):
    shape = (180, 210)
    raw = perfect_model(synthetic_scene(shape, tile, overlap, seed), tile, overlap, seed)
    rng = np.random.default_rng(seed)
    for inst in list(raw[::5]):  # duplicates within a window, shifted a little, some reaching out of the core
        dr, dc = rng.integers(-2, 3, 2)
        row = min(max(inst.row + dr, inst.window[1]), inst.window[1] + inst.window[3] - inst.mask.shape[0])
        col = min(max(inst.col + dc, inst.window[0]), inst.window[0] + inst.window[2] - inst.mask.shape[1])
        raw.append(Instance(row=int(row), col=int(col), mask=inst.mask, score=inst.score / 2, label=inst.label,
                            window=inst.window))
    windows = plan_windows(shape[1], shape[0], tile, overlap)
    private = private_regions(windows)
    index = {(int(w.col_off), int(w.row_off), int(w.width), int(w.height)): i for i, w in enumerate(windows)}
    final, pending = [], []
    for i in range(len(windows)):
        settled, waiting = settle_window([r for r in raw if index[r.window] == i], private[i], 0.5, 0.8)
        final += settled
        pending += waiting
    assert final and pending  # both paths are exercised
    early = sorted(map(signature, final + merge_instances(pending, 0.5, 0.8)))
    assert early == sorted(map(signature, merge_instances(raw, 0.5, 0.8)))


@pytest.mark.parametrize("size,tile,overlap", [((300, 200), 64, 16), ((130, 128), 64, 0), ((40, 90), 64, 8),
                                               ((1000, 600), 512, 64)])
def test_private_regions_keep_clear_of_every_other_window(size, tile, overlap):
    windows = plan_windows(size[0], size[1], tile, overlap)
    seen = np.zeros((len(windows), size[1] + tile, size[0] + tile), dtype=bool)
    for k, w in enumerate(windows):
        seen[k, int(w.row_off):int(w.row_off) + tile, int(w.col_off):int(w.col_off) + tile] = True
    for k, (c0, r0, c1, r1) in enumerate(private_regions(windows)):
        if c1 <= c0 or r1 <= r0:
            continue  # a window that others cover entirely has no private pixels
        assert seen[k, r0:r1, c0:c1].all()  # inside its own window
        others = np.delete(seen, k, axis=0).any(axis=0)
        assert not others[max(r0 - 1, 0):r1 + 1, max(c0 - 1, 0):c1 + 1].any()  # one pixel clear of the rest
    if overlap and len(windows) > 1:
        assert any(c1 > c0 and r1 > r0 for c0, r0, c1, r1 in private_regions(windows))


def test_different_labels_never_merge():
    shape = (100, 120)
    obj = np.zeros(shape, dtype=bool)
    obj[20:60, 30:90] = True
    merged = merge_instances(perfect_model([(obj, 1), (obj, 2)], 64, 16), 0.5, 0.8)
    assert sorted(m.label for m in merged) == [1, 2]
    assert all(np.array_equal(paste(m, shape), obj) for m in merged)


def test_duplicates_in_one_window_merge_on_the_whole_mask():
    mask = np.ones((10, 10), dtype=bool)
    a = Instance(row=5, col=5, mask=mask, score=0.6, label=1, window=(0, 0, 64, 64))
    b = Instance(row=6, col=5, mask=mask, score=0.9, label=1, window=(0, 0, 64, 64))
    (merged,) = merge_instances([a, b], 0.5, 0.8)
    assert merged.score == 0.9 and merged.mask.shape == (11, 10) and merged.mask.all()
    c = Instance(row=5, col=13, mask=mask, score=0.8, label=1, window=(0, 0, 64, 64))  # overlaps a by 2 columns
    assert len(merge_instances([a, c], 0.5, 0.8)) == 2


def test_holes_and_parts_are_kept():
    ring = np.ones((20, 20), dtype=bool)
    ring[5:15, 5:15] = False
    left = Instance(row=0, col=40, mask=ring[:, :16], score=0.5, label=1, window=(0, 0, 56, 64))
    right = Instance(row=0, col=48, mask=ring[:, 8:], score=0.5, label=1, window=(48, 0, 64, 64))
    (merged,) = merge_instances([left, right], 0.5, 0.8)
    assert np.array_equal(merged.mask, ring) and (merged.row, merged.col) == (0, 40)


def seam_heavy(n_objects: int, seed: int = 0, tile: int = 64, overlap: int = 16) -> list[Instance]:
    """Small objects at a fixed density on a tiled scene, each seen (cut) by every window it touches."""
    rng = np.random.default_rng(seed)
    side = int(np.sqrt(n_objects / 0.003))
    offsets = np.array(axis_offsets(side, tile, overlap))
    out = []
    for (r, c), (h, w) in zip(rng.integers(0, side - 12, (n_objects, 2)), rng.integers(3, 12, (n_objects, 2))):
        for wr in offsets[(offsets < r + h) & (offsets + tile > r)]:
            for wc in offsets[(offsets < c + w) & (offsets + tile > c)]:
                r0, c0 = max(r, wr), max(c, wc)
                r1, c1 = min(r + h, wr + tile), min(c + w, wc + tile)
                out.append(Instance(row=int(r0), col=int(c0), mask=np.ones((r1 - r0, c1 - c0), dtype=bool),
                                    score=0.5, label=1, window=(int(wc), int(wr), tile, tile)))
    return out


def test_candidate_pairs_grow_linearly_not_quadratically():
    small, large = seam_heavy(1000), seam_heavy(4000)
    pairs_small, pairs_large = len(candidate_pairs(small)), len(candidate_pairs(large))
    assert len(small) > 1300  # many fragments across seams
    assert pairs_large < 2 * len(large)  # a few per instance, against n^2 / 2 = millions
    assert pairs_large / pairs_small < 1.5 * len(large) / len(small)  # ~x4 for x4 instances, not x16
    for i, j in candidate_pairs(small):
        a, b = small[i].box, small[j].box
        assert i < j and min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_candidate_pairs_of_sparse_objects_are_few():
    rng = np.random.default_rng(0)
    instances = [Instance(row=int(r), col=int(c), mask=np.ones((5, 5), dtype=bool), score=0.5, label=1,
                          window=(0, 0, 10_000, 10_000)) for r, c in rng.integers(0, 10_000, (5000, 2))]
    assert len(candidate_pairs(instances)) < 200  # a handful of touching boxes, not 12.5 million pairs


def test_tile_prediction_thresholds_crops_and_places_in_scene_pixels():
    probs = np.zeros((4, 32, 32), dtype=np.float32)
    probs[0, 3:7, 10:20] = 0.9
    probs[0, 8, 12] = 0.6  # part of instance 0 after thresholding, so its crop is rows 3..8
    probs[1, 5:9, 5:9] = 0.4  # below the mask threshold: empty, dropped
    probs[2, 0:4, 0:4] = 0.9  # score below the score threshold
    probs[3, 20:30, 28:32] = 0.9  # right edge: partly padding
    valid = np.ones((32, 32), dtype=bool)
    valid[:, 30:] = False
    out = from_tile_prediction(probs, np.array([0.9, 0.8, 0.2, 0.7]), np.array([1, 2, 1, 3]), (100, 200, 32, 32),
                               valid, 0.5, 0.5)
    assert [(i.row, i.col, i.mask.shape, i.label, i.window) for i in out] == [
        (203, 110, (6, 10), 1, (100, 200, 32, 32)), (220, 128, (10, 2), 3, (100, 200, 32, 32))]
    assert out[0].mask.sum() == 41 and out[0].box == (110, 203, 120, 209) and out[1].mask.all()
    assert out[0].score == pytest.approx(0.9)


def test_padding_never_yields_objects():
    (win,) = plan_windows(50, 40, 64, 8)
    everywhere = np.ones((2, 64, 64), dtype=np.float32)
    everywhere[1, :40, :50] = 0  # only in the padding
    (inst,) = from_tile_prediction(everywhere, np.array([0.9, 0.9]), np.array([1, 1]), (0, 0, 64, 64),
                                   valid_region(win, 50, 40), 0.5, 0.5)
    assert inst.mask.shape == (40, 50) and inst.mask.all()


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
