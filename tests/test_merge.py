"""Tile instances and the seam merge, on synthetic scenes seen by a perfect model; window planning."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.instances import Instance, from_dense
from pipeline.features import Rows
from pipeline.merge import MergedObject, SceneMerge, SeamRule, candidate_pairs, merge_scene, settle_tile
from pipeline.rect import Rect
from pipeline.windows import WindowGrid, axis_offsets, plan_windows, valid_region

RULE = SeamRule()


def perfect_model(objects: list[tuple[np.ndarray, int]], tile: int, overlap: int,
                  seed: int = 0) -> tuple[list[Instance], WindowGrid]:
    """What a perfect model reports tiling the scene: in each window, every object's part inside it (with a
    score that differs from window to window), through `from_dense` as the pipeline does; and the plan."""
    rng = np.random.default_rng(seed)
    h, w = objects[0][0].shape
    grid = plan_windows(w, h, tile, overlap)
    out = []
    for index, win in enumerate(grid):
        views = np.zeros((len(objects), tile, tile), dtype=np.float32)
        for k, (mask, _) in enumerate(objects):
            part = mask[win.row0:win.row0 + tile, win.col0:win.col0 + tile]
            views[k, :part.shape[0], :part.shape[1]] = part
        views[:, :, :] *= rng.uniform(0.6, 1.0)  # soft probabilities, all above the mask threshold
        found = from_dense(views, rng.uniform(0.5, 1.0, len(objects)), np.array([lab for _, lab in objects]),
                           win, index, valid_region(win, w, h), 0.5, 0.1)
        for position, inst in enumerate(found):
            inst.position = position
        out += found
    return out, grid


def merge(instances: list[Instance], grid: WindowGrid, rule: SeamRule = RULE) -> list[MergedObject]:
    return merge_scene(instances, grid, rule)


def paste(obj: Instance | MergedObject, shape: tuple[int, int]) -> np.ndarray:
    mask, row, col = obj.mask() if isinstance(obj, MergedObject) else (obj.mask, obj.row, obj.col)
    full = np.zeros(shape, dtype=bool)
    full[row:row + mask.shape[0], col:col + mask.shape[1]] = mask
    return full


def two_windows(width: int = 112) -> WindowGrid:
    """Windows at columns 0 and 48 (64 px, overlap 16) over a width x 64 scene."""
    return plan_windows(width, 64, 64, 16)


def instance(row: int, col: int, mask: np.ndarray, score: float, label: int, grid: WindowGrid, tile: int,
             position: int = 0) -> Instance:
    return Instance(row=row, col=col, mask=mask, score=score, label=label, window=grid[tile], tile=tile,
                    position=position)


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
    raw, grid = perfect_model(objects, tile, overlap, seed)
    assert len(raw) > 1.3 * len(objects)  # many objects were cut by seams
    merged = merge(raw, grid)
    assert len(merged) == len(objects)
    for truth, label in objects:
        matches = [m for m in merged if (paste(m, shape) & truth).any()]
        assert len(matches) == 1
        (m,) = matches
        assert np.array_equal(paste(m, shape), truth) and m.label == label
        fragments = [f for f in raw if f.label == label and (paste(f, shape) & truth).any()]
        assert m.score == max(f.score for f in fragments)  # the highest score among its views
        mask, _, _ = m.mask()
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()  # tight


def test_four_window_corner_fragments_become_one():
    shape = (112, 112)
    obj = np.zeros(shape, dtype=bool)
    obj[40:72, 44:70] = True  # windows at 0 and 48 on both axes: every window sees a part
    raw, grid = perfect_model([(obj, 1)], 64, 16)
    assert len(raw) == 4 and len({f.window for f in raw}) == 4
    (merged,) = merge(raw, grid)
    assert np.array_equal(paste(merged, shape), obj)


def test_fragments_with_low_whole_mask_iou_merge():
    shape = (64, 112)
    obj = np.zeros(shape, dtype=bool)
    obj[10:40, 40:100] = True  # windows at cols 0 and 48: 24 of 60 columns on the left
    (left, right), grid = perfect_model([(obj, 1)], 64, 16)
    inter = (paste(left, shape) & paste(right, shape)).sum()
    assert inter / (paste(left, shape) | paste(right, shape)).sum() < 0.3  # whole-mask IoU would keep two
    (merged,) = merge([left, right], grid)
    assert np.array_equal(paste(merged, shape), obj)


def test_masks_that_disagree_near_a_tile_edge_merge_by_intersection_over_the_smaller():
    # The left window's model stopped 4 px short of its edge: inside the shared columns 48..63 the masks
    # cover 12 and 16 columns (IoU 0.75, IoS 1.0).
    grid = two_windows()
    left = instance(10, 30, np.ones((20, 30), dtype=bool), 0.7, 1, grid, 0)
    right = instance(10, 48, np.ones((20, 30), dtype=bool), 0.8, 1, grid, 1)
    assert len(merge([left, right], grid, SeamRule(0.9, 0.8))) == 1
    # Shifted right by 4 (clear of its window's edge: a whole view too): they share 8 of their 12 columns
    # there (IoU 0.5, IoS 0.67).
    shifted = instance(10, 52, np.ones((20, 12), dtype=bool), 0.8, 1, grid, 1)
    assert len(merge([left, shifted], grid, SeamRule(0.6, 0.8))) == 2
    assert len(merge([left, shifted], grid, SeamRule(0.5, 0.8))) == 1
    assert len(merge([left, shifted], grid, SeamRule(0.6, 0.6))) == 1


def test_neighbours_two_pixels_apart_across_a_seam_stay_two():
    shape = (100, 120)
    a = np.zeros(shape, dtype=bool)
    b = np.zeros(shape, dtype=bool)
    a[20:50, 30:56] = True
    b[20:50, 58:90] = True  # 2 px gap, both straddling the overlap of the windows at 0 and 48
    merged = merge(*perfect_model([(a, 1), (b, 1)], 64, 16))
    assert len(merged) == 2
    assert sorted(paste(m, shape).sum() for m in merged) == sorted([a.sum(), b.sum()])
    touching = np.zeros(shape, dtype=bool)
    touching[20:50, 56:90] = True  # no gap at all: still two objects, their masks are disjoint
    assert len(merge(*perfect_model([(a, 1), (touching, 1)], 64, 16))) == 2


def test_without_overlap_fragments_join_across_the_seam_line_and_neighbours_stay_apart():
    shape = (64, 128)  # windows at cols 0 and 64 abut along the seam between columns 63 and 64
    cut = np.zeros(shape, dtype=bool)
    cut[10:30, 50:80] = True
    (merged,) = merge(*perfect_model([(cut, 1)], 64, 0))
    assert np.array_equal(paste(merged, shape), cut)
    facing_left, facing_right = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    facing_left[10:30, 40:63] = True  # ends one pixel before the seam
    facing_right[10:30, 64:90] = True  # starts right at it
    assert len(merge(*perfect_model([(facing_left, 1), (facing_right, 1)], 64, 0))) == 2
    offset_left, offset_right = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    offset_left[5:20, 40:64] = True  # both touch the seam, at different rows
    offset_right[22:40, 64:90] = True
    assert len(merge(*perfect_model([(offset_left, 1), (offset_right, 1)], 64, 0))) == 2


def test_without_overlap_a_four_window_corner_object_becomes_one():
    shape = (128, 128)
    obj = np.zeros(shape, dtype=bool)
    obj[50:80, 54:70] = True
    raw, grid = perfect_model([(obj, 1)], 64, 0)
    assert len(raw) == 4
    (merged,) = merge(raw, grid)
    assert np.array_equal(paste(merged, shape), obj)


def signature(obj: MergedObject) -> tuple:
    mask, row, col = obj.mask()
    return obj.key, row, col, mask.tobytes(), mask.shape, obj.score, obj.label


@pytest.mark.parametrize("tile,overlap,seed", [(64, 16, 0), (50, 10, 1), (64, 0, 4), (40, 12, 3)])
def test_settling_each_window_early_gives_exactly_the_scene_merge(tile, overlap, seed):
    shape = (180, 210)
    raw, grid = perfect_model(synthetic_scene(shape, tile, overlap, seed), tile, overlap, seed)
    rng = np.random.default_rng(seed)
    for inst in list(raw[::5]):  # duplicates within a window, shifted a little, some reaching out of the core
        dr, dc = rng.integers(-2, 3, 2)
        win = inst.window
        row = min(max(inst.row + dr, win.row0), win.row1 - inst.mask.shape[0])
        col = min(max(inst.col + dc, win.col0), win.col1 - inst.mask.shape[1])
        raw.append(Instance(row=int(row), col=int(col), mask=inst.mask, score=inst.score / 2, label=inst.label,
                            window=win, tile=inst.tile, position=100 + inst.position))
    assert_settling_early_changes_nothing(raw, grid)


def assert_settling_early_changes_nothing(raw: list[Instance], grid: WindowGrid) -> None:
    """Each window settled on its own (`settle_tile`), then the rest merged: exactly the scene-wide merge."""
    final, pending = [], []
    for i in range(len(grid)):
        settled, waiting = settle_tile([r for r in raw if r.tile == i], grid, i, RULE)
        final += settled
        pending += waiting
    assert final and pending  # both paths are exercised
    early = sorted(map(signature, final + merge(pending, grid)))
    assert early == sorted(map(signature, merge(raw, grid)))


def signature_rows(objects: list[MergedObject]) -> Rows:
    """Rows whose 'geometry' is the object's outline as bytes (its mask, origin and shape): what the streamed
    merge hands on can be compared with the scene-wide merge's objects."""
    sig = [signature(o) for o in objects]
    return Rows(np.array([s[0] for s in sig], dtype=np.int64).reshape(-1, 2),
                [repr(s[1:5]).encode() for s in sig], np.array([s[6] for s in sig], dtype=np.int64),
                np.array([s[5] for s in sig], dtype=np.float64), np.zeros(len(sig)))


@pytest.mark.parametrize("tile,overlap,seed", [(64, 16, 0), (64, 0, 4), (40, 12, 3)])
def test_the_streamed_merge_gives_the_scene_merge_in_any_arrival_order(tile, overlap, seed):
    """`SceneMerge` fed settled windows in a random order (as workers finish them), flushed after each:
    the rows of `merge_scene`'s objects, each exactly once, every flush in output order."""
    raw, grid = perfect_model(synthetic_scene((180, 210), tile, overlap, seed), tile, overlap, seed)
    expected = signature_rows(merge(raw, grid))
    rng = np.random.default_rng(seed)
    for order in (range(len(grid)), rng.permutation(len(grid)), rng.permutation(len(grid))):
        stream = SceneMerge(grid, RULE, signature_rows)
        flushed = []
        for tile_index in order:
            final, pending = settle_tile([r for r in raw if r.tile == tile_index], grid, tile_index, RULE)
            stream.take(int(tile_index), signature_rows(final), pending,
                        signature_rows([MergedObject(m.key, m, [m], m.score, m.label) for m in pending]))
            flushed.append(stream.flush())
        flushed.append(stream.flush(last=True))
        keys = np.concatenate([rows.keys for rows in flushed])
        assert [tuple(k) for k in keys.tolist()] == sorted(tuple(k) for k in keys.tolist())  # in order overall
        rows = Rows.concat(flushed)
        assert rows.keys.tolist() == expected.keys.tolist() and rows.wkb == expected.wkb
        assert rows.class_ids.tolist() == expected.class_ids.tolist() and rows.scores.tolist() == expected.scores.tolist()
        assert stream.objects == len(expected) and not stream.held and not stream.groups


@pytest.mark.parametrize("size,tile,overlap", [((300, 200), 64, 16), ((130, 128), 64, 0), ((40, 90), 64, 8),
                                               ((1000, 600), 512, 64)])
def test_private_regions_keep_clear_of_every_other_window(size, tile, overlap):
    grid = plan_windows(size[0], size[1], tile, overlap)
    seen = np.zeros((len(grid), size[1] + tile, size[0] + tile), dtype=bool)
    for k, w in enumerate(grid):
        seen[k, w.row0:w.row1, w.col0:w.col1] = True
    private = [grid.private(w, RULE.reach) for w in grid]
    for k, p in enumerate(private):
        if p.empty:
            continue  # a window that others cover entirely has no private pixels
        assert seen[k, p.row0:p.row1, p.col0:p.col1].all()  # inside its own window
        others = np.delete(seen, k, axis=0).any(axis=0)
        assert not others[max(p.row0 - 1, 0):p.row1 + 1, max(p.col0 - 1, 0):p.col1 + 1].any()  # one pixel clear
    if overlap and len(grid) > 1:
        assert any(not p.empty for p in private)


def test_classes_of_one_object_merge_unless_the_rule_keeps_classes_apart():
    shape = (100, 120)
    obj = np.zeros(shape, dtype=bool)
    obj[20:60, 30:90] = True
    raw, grid = perfect_model([(obj, 1), (obj, 2)], 64, 16)
    apart = merge(raw, grid, SeamRule(class_agnostic=False))
    assert sorted(m.label for m in apart) == [1, 2]
    assert all(np.array_equal(paste(m, shape), obj) for m in apart)
    (together,) = merge(raw, grid, SeamRule(class_agnostic=True))
    best = max(raw, key=lambda f: f.score)
    assert together.label == best.label and together.score == best.score
    assert np.array_equal(paste(together, shape), obj)


def test_duplicates_in_one_window_give_the_best_view():
    grid = plan_windows(64, 64, 64, 16)  # one window, no inner edge: every view is whole
    mask = np.ones((10, 10), dtype=bool)
    a = instance(5, 5, mask, 0.6, 1, grid, 0, 0)
    b = instance(6, 5, mask, 0.9, 1, grid, 0, 1)
    (merged,) = merge([a, b], grid)
    assert merged.score == 0.9 and merged.view is b and merged.key == (0, 0)
    c = instance(5, 13, mask, 0.8, 1, grid, 0, 2)  # overlaps a by 2 columns
    assert len(merge([a, c], grid)) == 2


def test_holes_and_parts_are_kept():
    grid = plan_windows(112, 64, 64, 16)  # windows at columns 0 and 48
    ring = np.ones((40, 60), dtype=bool)
    ring[10:30, 10:50] = False  # at columns 20..80: wider than the overlap, so each view is cut
    left = instance(0, 20, ring[:, :44], 0.5, 1, grid, 0)  # columns 20..64
    right = instance(0, 48, ring[:, 28:], 0.5, 1, grid, 1)  # columns 48..80
    (merged,) = merge([left, right], grid)
    mask, row, col = merged.mask()
    assert merged.view is None and np.array_equal(mask, ring) and (row, col) == (0, 20)
    small = np.ones((20, 20), dtype=bool)
    small[5:15, 5:15] = False  # columns 40..60: whole in the left window, cut in the right one
    whole = instance(0, 40, small, 0.5, 1, grid, 0)
    cut = instance(0, 48, small[:, 8:], 0.7, 1, grid, 1)
    (merged,) = merge([whole, cut], grid)
    assert merged.view is whole and merged.score == 0.7


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
                                    score=0.5, label=1, window=Rect(int(wc), int(wr), int(wc) + tile, int(wr) + tile)))
    return out


def test_candidate_pairs_grow_linearly_not_quadratically():
    small, large = seam_heavy(1000), seam_heavy(4000)
    pairs_small, pairs_large = len(candidate_pairs(small, RULE)), len(candidate_pairs(large, RULE))
    assert len(small) > 1300  # many fragments across seams
    assert pairs_large < 2 * len(large)  # a few per instance, against n^2 / 2 = millions
    assert pairs_large / pairs_small < 1.5 * len(large) / len(small)  # ~x4 for x4 instances, not x16
    for i, j in candidate_pairs(small, RULE):
        assert i < j and not small[i].box.intersection(small[j].box).empty


def test_candidate_pairs_of_sparse_objects_are_few():
    rng = np.random.default_rng(0)
    instances = [Instance(row=int(r), col=int(c), mask=np.ones((5, 5), dtype=bool), score=0.5, label=1,
                          window=Rect(0, 0, 10_000, 10_000)) for r, c in rng.integers(0, 10_000, (5000, 2))]
    assert len(candidate_pairs(instances, RULE)) < 200  # a handful of touching boxes, not 12.5 million pairs


def test_dense_prediction_thresholds_crops_and_places_in_scene_pixels():
    probs = np.zeros((4, 32, 32), dtype=np.float32)
    probs[0, 3:7, 10:20] = 0.9
    probs[0, 8, 12] = 0.6  # part of instance 0 after thresholding, so its crop is rows 3..8
    probs[1, 5:9, 5:9] = 0.4  # below the mask threshold: empty, dropped
    probs[2, 0:4, 0:4] = 0.9  # score below the score threshold
    probs[3, 20:30, 28:32] = 0.9  # right edge: partly padding
    valid = np.ones((32, 32), dtype=bool)
    valid[:, 30:] = False
    window = Rect(100, 200, 132, 232)
    out = from_dense(probs, np.array([0.9, 0.8, 0.2, 0.7]), np.array([1, 2, 1, 3]), window, 5, valid, 0.5, 0.5)
    assert [(i.row, i.col, i.mask.shape, i.label, i.window, i.tile) for i in out] == [
        (203, 110, (6, 10), 1, window, 5), (220, 128, (10, 2), 3, window, 5)]
    assert out[0].mask.sum() == 41 and out[0].box == Rect(110, 203, 120, 209) and out[1].mask.all()
    assert out[0].score == pytest.approx(0.9)


def test_padding_never_yields_objects():
    (win,) = plan_windows(50, 40, 64, 8)
    everywhere = np.ones((2, 64, 64), dtype=np.float32)
    everywhere[1, :40, :50] = 0  # only in the padding
    (inst,) = from_dense(everywhere, np.array([0.9, 0.9]), np.array([1, 1]), win, 0, valid_region(win, 50, 40),
                         0.5, 0.5)
    assert inst.mask.shape == (40, 50) and inst.mask.all()


def test_windows_cover_the_scene_full_size_with_edge_shift():
    windows = plan_windows(300, 130, 128, 32)
    assert {(w.width, w.height) for w in windows} == {(128, 128)}
    assert sorted({w.col0 for w in windows}) == [0, 96, 172]
    assert sorted({w.row0 for w in windows}) == [0, 2]
    covered = np.zeros((130, 300), dtype=int)
    for w in windows:
        covered[w.row0:w.row1, w.col0:w.col1] += 1
    assert covered.min() >= 1
    (small,) = plan_windows(50, 40, 128, 32)
    assert (small.col0, small.row0, small.width) == (0, 0, 128)
    assert valid_region(small, 50, 40).sum() == 50 * 40
