"""Seam merge: detections of one object from overlapping windows (fragments or duplicates) become one.

Whole-mask IoU is the wrong test for fragments: a fragment holding 30 % of an object has a low IoU with its
neighbour's fragment. Two detections from different windows are compared only where both windows could see
them (the intersection of the two windows); they are one object when their masks agree there: IoU >=
`iou_threshold` or intersection over the smaller >= `ios_threshold`, both measured inside that region. Two
detections from the same window (duplicates) are compared on their whole masks with the same thresholds.
Distinct objects, however close, have disjoint masks and never merge.

Windows that only abut (`overlap` 0) share no pixel, so there the region is the seam itself: the last
pixel line of one window against the first of the other, one pixel across. Fragments of an object cut by
the seam line up along it; two objects that merely face each other across the seam with a gap do not touch it.

Candidate pairs come from a spatial index over the boxes, so the cost grows as n log n, never n^2; each
comparison slices the two small crops, never a tile- or scene-sized array.

A merged instance: mask = union of its members' masks, score = the highest score among its fragments,
window = that best member's window.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import shapely

from pipeline.instances import Instance

Rect = tuple[int, int, int, int]  # (col0, row0, col1, row1), scene pixel corners, end exclusive


def candidate_pairs(instances: list[Instance]) -> np.ndarray:
    """(M, 2) index pairs i < j that could be one object: same label, boxes sharing at least one pixel, and,
    for detections from different windows, that shared part lying where both windows could see it; or, for
    windows that only abut, boxes touching (`same_object` then checks the seam)."""
    if len(instances) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    boxes = np.array([inst.box for inst in instances], dtype=np.int64)
    wins = np.array([inst.window for inst in instances], dtype=np.int64)
    wins[:, 2:] += wins[:, :2]  # (col_off, row_off, width, height) -> (col0, row0, col1, row1)
    labels = np.array([inst.label for inst in instances], dtype=np.int64)
    tree = shapely.STRtree(shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]))
    i, j = tree.query(tree.geometries)  # boxes are their own envelopes: the tree's test is the exact one
    keep = (i < j) & (labels[i] == labels[j])
    i, j = i[keep], j[keep]
    # The index also reports boxes that only touch along an edge: require a shared pixel, and for different
    # windows a shared pixel inside both windows (elsewhere the two masks cannot meet in the compared region).
    same_window = (wins[i] == wins[j]).all(axis=1)
    lo = np.maximum(boxes[i, :2], boxes[j, :2])
    hi = np.minimum(boxes[i, 2:], boxes[j, 2:])
    lo = np.where(same_window[:, None], lo, np.maximum(lo, np.maximum(wins[i, :2], wins[j, :2])))
    hi = np.where(same_window[:, None], hi, np.minimum(hi, np.minimum(wins[i, 2:], wins[j, 2:])))
    windows_apart = (np.minimum(wins[i, 2:], wins[j, 2:]) <= np.maximum(wins[i, :2], wins[j, :2])).any(axis=1)
    windows_abut = ~same_window & windows_apart  # touching boxes there can only meet along the seam
    keep = (hi > lo).all(axis=1) | windows_abut
    return np.stack([i[keep], j[keep]], axis=1)


def pixels_in(inst: Instance, rect: Rect) -> np.ndarray:
    """The part of `inst.mask` inside a scene rectangle (clipped to the mask's box; possibly empty)."""
    r0, c0 = max(rect[1] - inst.row, 0), max(rect[0] - inst.col, 0)
    return inst.mask[r0:max(rect[3] - inst.row, r0), c0:max(rect[2] - inst.col, c0)]


def compared_region(a: Instance, b: Instance) -> tuple[Rect, tuple[int, int]] | None:
    """Where two detections are compared, and the (col, row) shift that carries b's pixels there.

    Same window: both whole masks, no shift. Overlapping windows: their intersection, no shift. Windows
    abutting along a seam: a's one-pixel line at the seam, with b's line on the other side shifted onto
    it. Windows meeting only at a corner, or apart: None (a corner object links through its edge fragments).
    """
    if a.window == b.window:
        (a0, a1, a2, a3), (b0, b1, b2, b3) = a.box, b.box
        return (min(a0, b0), min(a1, b1), max(a2, b2), max(a3, b3)), (0, 0)
    (ac, ar, aw, ah), (bc, br, bw, bh) = a.window, b.window
    lo = [max(ac, bc), max(ar, br)]
    hi = [min(ac + aw, bc + bw), min(ar + ah, br + bh)]
    if hi[0] > lo[0] and hi[1] > lo[1]:
        return (lo[0], lo[1], hi[0], hi[1]), (0, 0)
    across = [axis for axis in (0, 1) if hi[axis] == lo[axis]]
    if len(across) != 1 or hi[1 - across[0]] <= lo[1 - across[0]]:
        return None
    axis, seam = across[0], lo[across[0]]
    a_before = (ac, ar)[axis] < seam  # a's window ends at the seam; b's starts there
    shift = [0, 0]
    shift[axis] = 1 if a_before else -1
    lo[axis], hi[axis] = (seam - 1, seam) if a_before else (seam, seam + 1)
    return (lo[0], lo[1], hi[0], hi[1]), (shift[0], shift[1])


def same_object(a: Instance, b: Instance, iou_threshold: float, ios_threshold: float) -> bool:
    """Do two same-class detections show one object? (see the module docstring)"""
    found = compared_region(a, b)
    if found is None:
        return False
    region, (dc, dr) = found
    if dc or dr:
        b = replace(b, col=b.col - dc, row=b.row - dr)  # a view: the mask is not copied
    (a0, a1, a2, a3), (b0, b1, b2, b3) = a.box, b.box
    area_a = int(np.count_nonzero(pixels_in(a, region)))
    area_b = int(np.count_nonzero(pixels_in(b, region)))
    if area_a == 0 or area_b == 0:
        return False
    shared = (max(a0, b0, region[0]), max(a1, b1, region[1]), min(a2, b2, region[2]), min(a3, b3, region[3]))
    if shared[2] <= shared[0] or shared[3] <= shared[1]:
        return False
    inter = int(np.count_nonzero(pixels_in(a, shared) & pixels_in(b, shared)))
    if inter == 0:
        return False
    return inter / (area_a + area_b - inter) >= iou_threshold or inter / min(area_a, area_b) >= ios_threshold


def find(parent: list[int], i: int) -> int:
    """Union-find root with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def union_of(members: list[Instance]) -> Instance:
    """One instance: the members' masks united on their union box (still tight), the highest score and the
    window of the member that has it."""
    if len(members) == 1:
        return members[0]
    c0 = min(m.col for m in members)
    r0 = min(m.row for m in members)
    c1 = max(m.box[2] for m in members)
    r1 = max(m.box[3] for m in members)
    mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    for m in members:
        h, w = m.mask.shape
        mask[m.row - r0:m.row - r0 + h, m.col - c0:m.col - c0 + w] |= m.mask
    best = max(members, key=lambda m: m.score)
    return Instance(row=r0, col=c0, mask=mask, score=best.score, label=best.label, window=best.window)


def group(instances: list[Instance], iou_threshold: float, ios_threshold: float) -> list[list[Instance]]:
    """Detections of one object together (transitively: the four fragments at a four-window corner form one
    group), groups in the order of their first member in the input."""
    parent = list(range(len(instances)))
    for i, j in candidate_pairs(instances).tolist():
        ri, rj = find(parent, i), find(parent, j)
        if ri != rj and same_object(instances[i], instances[j], iou_threshold, ios_threshold):
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[Instance]] = {}
    for i, inst in enumerate(instances):
        groups.setdefault(find(parent, i), []).append(inst)
    return list(groups.values())


def merge_instances(instances: list[Instance], iou_threshold: float, ios_threshold: float) -> list[Instance]:
    """One instance per object: each group of detections united."""
    return [union_of(members) for members in group(instances, iou_threshold, ios_threshold)]


def settle_window(instances: list[Instance], private: Rect, iou_threshold: float,
                  ios_threshold: float) -> tuple[list[Instance], list[Instance]]:
    """One window's detections as soon as it is done: (final objects, detections left for the scene merge).

    A group of this window's duplicates lying wholly inside `private` (pixels no other window sees, see
    `windows.private_regions`) cannot pair with any detection of another window, so the scene-wide merge
    would form exactly this group: it is final now and can be polygonized while other tiles are computed.
    Every other group is returned as its original members, so the scene merge sees what it would have seen.
    """
    final: list[Instance] = []
    pending: list[Instance] = []
    for members in group(instances, iou_threshold, ios_threshold):
        inside = all(private[0] <= m.col and private[1] <= m.row and m.box[2] <= private[2] and m.box[3] <= private[3]
                     for m in members)
        if inside:
            final.append(union_of(members))
        else:
            pending += members
    return final, pending
