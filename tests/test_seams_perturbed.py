"""The seam merge under a real model's view (tests/perturbed.py): each window's views grown or shrunk by up
to 2 px, scores in [0.6, 1], classes flipped from window to window. Every true object must come out once,
glued to no neighbour, its outline within 2 px of the truth; settling windows early must change nothing."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.merge import SeamRule, merge_scene
from pipeline.windows import plan_windows
from tests.perturbed import JITTER, outlines, perturbed_model, seam_scene, tally
from tests.test_merge import assert_settling_early_changes_nothing, instance, paste

RULE = SeamRule()
CASES = [(tile, overlap) for tile in (512, 256, 128) for overlap in (64, 16, 0)]


def assert_exact(objects, merged) -> None:
    found = tally(objects, outlines(merged))
    n = len(objects)
    assert (found.merged, found.once, found.slivers, found.doubled, found.glued) == (n, n, 0, 0, 0), found
    assert found.outline <= JITTER, found


@pytest.mark.parametrize("tile,overlap", CASES)
def test_every_object_comes_out_once_within_two_pixels_under_a_perturbed_model(tile, overlap):
    for seed in range(3):
        grid, objects = seam_scene(tile, overlap, seed)
        raw = perturbed_model(grid, objects, seed)
        assert len(raw) > 1.5 * len(objects)  # most objects are seen by several windows
        merged = merge_scene(raw, grid, RULE)
        assert_exact(objects, merged)
        assert any(len({p.label for p in m.parts}) > 1 for m in merged)  # some classes were flipped
        for m in merged:  # class and score: the highest-scoring view's
            best = max(m.parts, key=lambda p: p.score)
            assert (m.label, m.score) == (best.label, best.score)


@pytest.mark.parametrize("tile,overlap", [case for case in CASES if case[1]])
def test_cut_views_that_stop_short_of_the_window_edge_still_make_one_object(tile, overlap):
    # A shrunk view of a cut object stops up to 2 px short of its window's edge: it is still truncated.
    # (Without overlap, such a view cannot be told from a neighbour 1-2 px across the seam line: the
    # exact-oracle test of facing objects in tests/test_merge.py keeps those two.)
    for seed in range(3):
        grid, objects = seam_scene(tile, overlap, seed)
        assert_exact(objects, merge_scene(perturbed_model(grid, objects, seed, cut_views_shrink=True), grid, RULE))


def test_class_confusion_at_seams_splits_objects_only_when_classes_are_kept_apart():
    grid, objects = seam_scene(256, 16, 0)
    confused = perturbed_model(grid, objects, 0, flip=0.3)
    assert_exact(objects, merge_scene(confused, grid, SeamRule(class_agnostic=True)))
    split = tally(objects, outlines(merge_scene(confused, grid, SeamRule(class_agnostic=False))))
    assert split.merged > len(objects) and split.doubled + split.slivers > 0
    consistent = perturbed_model(grid, objects, 0, flip=0.0)  # a model whose classes agree across seams
    assert_exact(objects, merge_scene(consistent, grid, SeamRule(class_agnostic=False)))


@pytest.mark.parametrize("tile,overlap,shrink", [(128, 16, False), (128, 0, False), (256, 64, True), (128, 16, True)])
def test_settling_each_window_early_gives_exactly_the_scene_merge_under_a_perturbed_model(tile, overlap, shrink):
    grid, objects = seam_scene(tile, overlap, 1)
    assert_settling_early_changes_nothing(perturbed_model(grid, objects, 1, cut_views_shrink=shrink), grid)


def test_views_stopping_edge_margin_short_of_their_window_edges_are_united():
    grid = plan_windows(112, 64, 64, 16)  # windows at columns 0 and 48
    shape = (64, 112)
    obj = np.zeros(shape, dtype=bool)
    obj[10:30, 30:90] = True
    left = instance(10, 30, obj[10:30, 30:62], 0.8, 1, grid, 0)  # stops 2 px short of column 64
    right = instance(10, 50, obj[10:30, 50:90], 0.7, 1, grid, 1)  # starts 2 px after column 48
    (merged,) = merge_scene([left, right], grid, RULE)
    assert np.array_equal(paste(merged, shape), obj)


def test_a_whole_view_missing_a_part_gets_it_from_the_fuller_view():
    grid = plan_windows(112, 64, 64, 16)  # windows at columns 0 and 48
    shape = (64, 112)
    past = np.zeros(shape, dtype=bool)
    past[10:30, 36:46] = past[10:30, 52:62] = True  # two parts; the left one lies outside the right window
    alone = instance(10, 52, past[10:30, 52:62], 0.9, 1, grid, 1)  # whole: 4 px from column 48
    fuller = instance(10, 36, past[10:30, 36:62], 0.6, 2, grid, 0)  # both parts, 2 px from column 64
    (merged,) = merge_scene([alone, fuller], grid, RULE)
    assert np.array_equal(paste(merged, shape), past) and (merged.label, merged.score) == (1, 0.9)
    near = np.zeros(shape, dtype=bool)
    near[10:30, 40:50] = near[10:30, 61:75] = True  # the right part's first 3 columns are in the left window
    alone = instance(10, 40, near[10:30, 40:50], 0.9, 1, grid, 0)  # the model there missed them
    fuller = instance(10, 48, near[10:30, 48:75], 0.6, 1, grid, 1)
    (merged,) = merge_scene([alone, fuller], grid, RULE)
    assert np.array_equal(paste(merged, shape), near)


def test_a_lone_sliver_along_a_seam_without_overlap_is_dropped():
    grid = plan_windows(128, 64, 64, 0)  # windows at columns 0 and 64, abutting
    mask = np.ones((20, 3), dtype=bool)
    sliver = instance(10, 61, mask, 0.9, 1, grid, 0)  # 3 px of a grown view, up to the seam
    rest = instance(8, 65, np.ones((24, 30), dtype=bool), 0.7, 1, grid, 1)  # the object, 1 px short of it
    (merged,) = merge_scene([sliver, rest], grid, RULE)
    assert merged.view is rest
    deeper = instance(10, 60, np.ones((20, 4), dtype=bool), 0.9, 1, grid, 0)  # 4 px deep: an object of its own
    assert len(merge_scene([deeper, rest], grid, RULE)) == 2
