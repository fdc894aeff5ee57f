"""Seam merge: detections of one object from overlapping windows (fragments or duplicates) become one.

Whole-mask IoU is the wrong test for fragments: a fragment holding 30 % of an object has a low IoU with its
neighbour's fragment. Two detections from different windows are compared only where both windows could see
them (the intersection of the two windows); they are one object when their masks agree there. Candidate
pairs come from a spatial index over boxes, so the cost grows as n log n, never n^2.
"""

from __future__ import annotations

import numpy as np
import shapely

from pipeline.instances import Instance


def candidate_pairs(instances: list[Instance]) -> np.ndarray:
    """(M, 2) index pairs i < j of same-label instances whose boxes share at least one pixel."""
    if len(instances) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    boxes = np.array([inst.box for inst in instances], dtype=np.float64)
    labels = np.array([inst.label for inst in instances])
    geoms = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    keep = i < j
    i, j = i[keep], j[keep]
    # "intersects" includes boxes that only touch along an edge; require a shared pixel and the same class.
    overlap_w = np.minimum(boxes[i, 2], boxes[j, 2]) - np.maximum(boxes[i, 0], boxes[j, 0])
    overlap_h = np.minimum(boxes[i, 3], boxes[j, 3]) - np.maximum(boxes[i, 1], boxes[j, 1])
    keep = (overlap_w > 0) & (overlap_h > 0) & (labels[i] == labels[j])
    return np.stack([i[keep], j[keep]], axis=1)


def crop(inst: Instance, c0: int, r0: int, c1: int, r1: int) -> np.ndarray:
    """The part of `inst.mask` inside scene rectangle [c0, c1) x [r0, r1) (which must lie in its box)."""
    return inst.mask[r0 - inst.row:r1 - inst.row, c0 - inst.col:c1 - inst.col]


def same_object(a: Instance, b: Instance, iou_threshold: float, ios_threshold: float) -> bool:
    """Do two same-class detections show the same object? (see the module docstring)"""
    c0, r0 = max(a.box[0], b.box[0]), max(a.box[1], b.box[1])
    c1, r1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if a.window == b.window:
        inter = int(np.count_nonzero(crop(a, c0, r0, c1, r1) & crop(b, c0, r0, c1, r1)))
        area_a, area_b = int(np.count_nonzero(a.mask)), int(np.count_nonzero(b.mask))
    else:
        wa, wb = a.window, b.window
        c0, r0 = max(c0, wa[0], wb[0]), max(r0, wa[1], wb[1])
        c1, r1 = min(c1, wa[0] + wa[2], wb[0] + wb[2]), min(r1, wa[1] + wa[3], wb[1] + wb[3])
        if c1 <= c0 or r1 <= r0:
            return False
        # Both masks restricted to the shared view: box clipping is exact because pixels outside a box are empty.
        area_a = count_in(a, c0, r0, c1, r1)
        area_b = count_in(b, c0, r0, c1, r1)
        if area_a == 0 or area_b == 0:
            return False
        bc0, br0 = max(a.box[0], b.box[0], c0), max(a.box[1], b.box[1], r0)
        bc1, br1 = min(a.box[2], b.box[2], c1), min(a.box[3], b.box[3], r1)
        inter = int(np.count_nonzero(crop(a, bc0, br0, bc1, br1) & crop(b, bc0, br0, bc1, br1)))
    if inter == 0:
        return False
    union = area_a + area_b - inter
    return inter / union >= iou_threshold or inter / min(area_a, area_b) >= ios_threshold


def count_in(inst: Instance, c0: int, r0: int, c1: int, r1: int) -> int:
    """Mask pixels of `inst` inside a scene rectangle."""
    c0, r0 = max(c0, inst.col), max(r0, inst.row)
    c1, r1 = min(c1, inst.box[2]), min(r1, inst.box[3])
    if c1 <= c0 or r1 <= r0:
        return 0
    return int(np.count_nonzero(crop(inst, c0, r0, c1, r1)))


def find(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def union_of(members: list[Instance]) -> Instance:
    """One instance: union mask on the union box; the highest score; the best member's window."""
    if len(members) == 1:
        return members[0]
    c0 = min(m.box[0] for m in members)
    r0 = min(m.box[1] for m in members)
    c1 = max(m.box[2] for m in members)
    r1 = max(m.box[3] for m in members)
    mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    for m in members:
        h, w = m.mask.shape
        mask[m.row - r0:m.row - r0 + h, m.col - c0:m.col - c0 + w] |= m.mask
    best = max(members, key=lambda m: m.score)
    return Instance(row=r0, col=c0, mask=mask, score=best.score, label=best.label, window=best.window)


def merge_instances(instances: list[Instance], iou_threshold: float, ios_threshold: float) -> list[Instance]:
    """Group detections of the same object (transitively: a four-window corner gives one) and unite them."""
    parent = np.arange(len(instances))
    for i, j in candidate_pairs(instances):
        ri, rj = find(parent, int(i)), find(parent, int(j))
        if ri != rj and same_object(instances[i], instances[j], iou_threshold, ios_threshold):
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[Instance]] = {}
    for i, inst in enumerate(instances):
        groups.setdefault(find(parent, i), []).append(inst)
    return [union_of(members) for _, members in sorted(groups.items())]
