"""Seam merge: the views of one object from overlapping windows (fragments or duplicates) become one object.

The rule (`SeamRule`), in the README's words:
- Two detections show one object when their masks agree where both windows could see them (the
  intersection of the two windows): IoU >= `iou_threshold`, or intersection over the smaller mask there
  >= `ios_threshold`. Two detections of one window (duplicates) are compared on their whole masks. Windows
  that only abut (`overlap` 0) share no pixel; there the last pixel line of one is compared with the first
  of the other, one pixel across (so a view that stops short of the seam line cannot be told from a
  neighbour that close across it: a model whose cut views may stop short of its tile's edge needs overlap).
  Whole-mask IoU would be wrong for fragments: a fragment holding 30 % of an object has a low IoU with its
  neighbour's fragment.
- A view whose box comes within `edge_margin` pixels of an inner edge of its window (an edge inside the
  scene, not the scene's own; a gap of `edge_margin` pixels or fewer) may be cut there: it is *truncated*;
  any other view is *whole*. `edge_margin` is the model's outline error: its view of an object that the
  edge cuts may stop up to that far short of the edge. A model sees a whole view with context on every
  side, so a whole view stands for its object as it is wherever its window saw with context (clear of the
  inner edges by more than `edge_margin`): views that agree with it join it (their score and class count)
  without changing its outline there; only their pixels beyond that ground are added (the part of a
  two-part object that lies past the window's edge, or so near it that the model missed it).
- Truncated views of an object no window saw whole (larger than the overlap, or cut by the seams) are
  united. Truncated views lying in ground another window saw whole (inside that window, clear of its inner
  edges) yield to what that window found there, and are dropped if they agree with none of it: a 2 px
  sliver along a window's edge never stands alone. Nor does a *sliver* where no other window saw the ground
  (windows without overlap): truncated views reaching less than 2 * `edge_margin` pixels into their window,
  which may be nothing but one view's excess where the neighbour's view of the object, short by up to
  `edge_margin`, does not reach the seam line, are dropped when they join nothing.
- With `class_agnostic`, views of different classes can be one object (a model's class confusion across a
  seam); without it, only views of one class are.
- An object's class and score are those of its highest-scoring view (ties: the earliest window and
  position); its outline is its most central whole view (farthest from its window's inner edges) with the
  pieces above, else the union of its views.
- Distinct objects, however close, have (nearly) disjoint masks and never merge; a truncated view joins at
  most one whole object, so it can never glue two together.

Candidate pairs come from a spatial index over the boxes, so the cost grows as n log n, never n^2; each
comparison slices the two small crops, never a tile- or scene-sized array. The streamed merge (`SceneMerge`)
looks at each detection once, when its window arrives. Two detections can only interact when their boxes
share a pixel (or touch across an abutting seam): the rule's `reach` is one pixel, which sets how far from
every other window a window's private region keeps (`WindowGrid.private`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import shapely
from scipy import sparse
from scipy.sparse import csgraph

from pipeline.features import Rows
from pipeline.instances import Instance, tight
from pipeline.rect import Rect
from pipeline.windows import WindowGrid


@dataclass(frozen=True)
class SeamRule:
    iou_threshold: float = 0.5
    ios_threshold: float = 0.8
    class_agnostic: bool = True
    edge_margin: int = 2

    @property
    def reach(self) -> int:
        """Pixels beyond a detection's box where a detection that interacts with it can lie."""
        return 1


@dataclass
class MergedObject:
    key: tuple[int, int]  # its earliest view's (window index, position): its row's place in the output
    view: Instance | None  # the view whose outline stands, or None: the union of `pieces`
    parts: list[Instance]  # every view of the object
    score: float
    label: int
    pieces: list[Instance] = field(default_factory=list)  # what the outline unites when `view` is None

    def mask(self) -> tuple[np.ndarray, int, int]:
        """(bool mask, row, col) of the object's outline (tight: the pieces are)."""
        if self.view is not None:
            return self.view.mask, self.view.row, self.view.col
        c0, r0 = min(m.col for m in self.pieces), min(m.row for m in self.pieces)
        c1, r1 = max(m.box.col1 for m in self.pieces), max(m.box.row1 for m in self.pieces)
        mask = np.zeros((r1 - r0, c1 - c0), dtype=bool)
        for m in self.pieces:
            h, w = m.mask.shape
            mask[m.row - r0:m.row - r0 + h, m.col - c0:m.col - c0 + w] |= m.mask
        return mask, r0, c0


def candidate_pairs(instances: list[Instance], rule: SeamRule) -> np.ndarray:
    """(M, 2) index pairs i < j that could be one object: boxes sharing at least one pixel (of the same class
    unless class-agnostic) and, for detections from different windows, that shared part lying where both
    windows could see it; or, for windows that only abut, boxes touching (`same_object` then checks the seam)."""
    if len(instances) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    boxes = np.array([inst.box.tuple() for inst in instances], dtype=np.int64)
    wins = np.array([inst.window.tuple() for inst in instances], dtype=np.int64)
    tree = shapely.STRtree(shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]))
    i, j = tree.query(tree.geometries)  # boxes are their own envelopes: the tree's test is the exact one
    keep = i < j
    if not rule.class_agnostic:
        labels = np.array([inst.label for inst in instances], dtype=np.int64)
        keep &= labels[i] == labels[j]
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


Box = tuple[int, int, int, int]  # (col0, row0, col1, row1) as plain ints: what runs once per candidate pair


def shared_box(x: Box, y: Box) -> Box | None:
    """The pixels two boxes share, or None."""
    c0, r0 = (x[0] if x[0] > y[0] else y[0]), (x[1] if x[1] > y[1] else y[1])
    c1, r1 = (x[2] if x[2] < y[2] else y[2]), (x[3] if x[3] < y[3] else y[3])
    return (c0, r0, c1, r1) if c0 < c1 and r0 < r1 else None


def crop(mask: np.ndarray, row: int, col: int, box: Box) -> np.ndarray:
    """The part of a mask placed at (row, col) inside `box`, a box within the mask's own."""
    return mask[box[1] - row:box[3] - row, box[0] - col:box[2] - col]


def compared_region(a: Instance, b: Instance) -> tuple[Box, tuple[int, int]] | None:
    """Where two detections are compared, and the (col, row) shift that carries b's pixels there.

    Same window: both whole masks, no shift. Overlapping windows: their intersection, no shift. Windows
    abutting along a seam: a's one-pixel line at the seam, with b's line on the other side shifted onto
    it. Windows meeting only at a corner, or apart: None (a corner object links through its edge fragments).
    """
    x, y = a.window.tuple(), b.window.tuple()
    if x == y:
        (ah, aw), (bh, bw) = a.mask.shape, b.mask.shape
        return (min(a.col, b.col), min(a.row, b.row), max(a.col + aw, b.col + bw),
                max(a.row + ah, b.row + bh)), (0, 0)
    lo = [max(x[0], y[0]), max(x[1], y[1])]
    hi = [min(x[2], y[2]), min(x[3], y[3])]
    if lo[0] < hi[0] and lo[1] < hi[1]:
        return (lo[0], lo[1], hi[0], hi[1]), (0, 0)
    across = [axis for axis in (0, 1) if hi[axis] == lo[axis]]
    if len(across) != 1 or hi[1 - across[0]] <= lo[1 - across[0]]:
        return None
    axis, seam = across[0], lo[across[0]]
    a_before = x[axis] < seam  # a's window ends at the seam; b's starts there
    shift = [0, 0]
    shift[axis] = 1 if a_before else -1
    lo[axis], hi[axis] = (seam - 1, seam) if a_before else (seam, seam + 1)
    return (lo[0], lo[1], hi[0], hi[1]), (shift[0], shift[1])


def agreement(a: Instance, b: Instance, rule: SeamRule) -> int:
    """The pixels two detections share in their compared region when they show one object (see the module
    docstring), else 0. Plain ints throughout: it runs once per candidate pair."""
    found = compared_region(a, b)
    if found is None:
        return 0
    region, (dc, dr) = found
    (ah, aw), (bh, bw) = a.mask.shape, b.mask.shape
    b_row, b_col = b.row - dr, b.col - dc  # b's pixels carried into the region (across an abutting seam)
    in_a = shared_box((a.col, a.row, a.col + aw, a.row + ah), region)
    in_b = shared_box((b_col, b_row, b_col + bw, b_row + bh), region)
    if in_a is None or in_b is None:
        return 0
    both = shared_box(in_a, in_b)
    if both is None:
        return 0
    inter = int(np.count_nonzero(crop(a.mask, a.row, a.col, both) & crop(b.mask, b_row, b_col, both)))
    if inter == 0:
        return 0
    area_a = int(np.count_nonzero(crop(a.mask, a.row, a.col, in_a)))
    area_b = int(np.count_nonzero(crop(b.mask, b_row, b_col, in_b)))
    same = inter / (area_a + area_b - inter) >= rule.iou_threshold or inter / min(area_a, area_b) >= rule.ios_threshold
    return inter if same else 0


def find(parent: list[int] | dict[int, int], i: int) -> int:
    """Union-find root with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def clusters(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected groups of 0..n-1 under `pairs`, each in increasing order, groups by their first member."""
    parent = list(range(n))
    for i, j in pairs:
        ri, rj = find(parent, i), find(parent, j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(parent, i), []).append(i)
    return list(groups.values())


def components(instances: list[Instance], rule: SeamRule) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Detections that may interact (candidate pairs, transitively), which one resolution must see together:
    each component's members (increasing) and its candidate pairs in the members' own numbering, components
    in the order of their first member. In arrays (scipy's connected components): it runs over every pending
    detection of a scene."""
    n = len(instances)
    pairs = candidate_pairs(instances, rule)
    graph = sparse.coo_array((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = csgraph.connected_components(graph, directed=False)
    _, first = np.unique(label, return_index=True)  # each component's first member
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(len(first))
    group = rank[label]
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(len(first) + 1))
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n) - starts[group[order]]
    by_group = np.argsort(group[pairs[:, 0]], kind="stable")
    pair_starts = np.searchsorted(group[pairs[by_group, 0]], np.arange(len(first) + 1))
    members = order.tolist()
    local = list(zip(position[pairs[by_group, 0]].tolist(), position[pairs[by_group, 1]].tolist()))
    return [(members[s:e], local[ps:pe]) for s, e, ps, pe in
            zip(starts[:-1].tolist(), starts[1:].tolist(), pair_starts[:-1].tolist(), pair_starts[1:].tolist())]


def edge_room(inst: Instance, grid: WindowGrid) -> int:
    """Pixels between a detection's box and the nearest inner edge of its window (a large number if none)."""
    box, win = inst.box, inst.window
    left, top, right, bottom = grid.inner(win)
    room = 1 << 30
    if left:
        room = box.col0 - win.col0
    if top and box.row0 - win.row0 < room:
        room = box.row0 - win.row0
    if right and win.col1 - box.col1 < room:
        room = win.col1 - box.col1
    if bottom and win.row1 - box.row1 < room:
        room = win.row1 - box.row1
    return room


def edge_depth(inst: Instance, grid: WindowGrid) -> int:
    """Pixels a detection's box reaches into its window from the nearest inner edge (a large number if none)."""
    box, win = inst.box, inst.window
    depths = [box.col1 - win.col0, box.row1 - win.row0, win.col1 - box.col0, win.row1 - box.row0]
    return min((d for d, i in zip(depths, grid.inner(win)) if i), default=1 << 30)


def is_whole(inst: Instance, grid: WindowGrid, rule: SeamRule) -> bool:
    return edge_room(inst, grid) > rule.edge_margin


def whole_ground(window: Rect, grid: WindowGrid, rule: SeamRule) -> Rect:
    """The part of a window where its views are whole: clear of its inner edges by more than the margin."""
    return grid.core(window, rule.edge_margin + 1)


def seen_whole_elsewhere(box: Rect, windows: set[int], grid: WindowGrid, rule: SeamRule) -> bool:
    """Did a window other than `windows` see all of `box` where its views are whole?"""
    return any(whole_ground(grid[w], grid, rule).contains(box) for w in grid.seen_by(box) if w not in windows)


def stands_alone(parts: list[Instance], grid: WindowGrid, rule: SeamRule) -> bool:
    """Does a group of truncated views that joined no whole view stand as an object? Not when all of it is
    slivers, nor when another window saw its ground whole (see the module docstring)."""
    if all(edge_depth(p, grid) < 2 * rule.edge_margin for p in parts):
        return False
    box = Rect(min(p.box.col0 for p in parts), min(p.box.row0 for p in parts),
               max(p.box.col1 for p in parts), max(p.box.row1 for p in parts))
    return not seen_whole_elsewhere(box, {p.tile for p in parts}, grid, rule)


def outside(inst: Instance, rect: Rect) -> Instance | None:
    """The pixels of a detection outside a rectangle, as a detection cropped to them (None: there are none)."""
    inside = rect.intersection(inst.box)
    if inside.empty:
        return inst
    mask = inst.mask.copy()
    mask[inside.row0 - inst.row:inside.row1 - inst.row, inside.col0 - inst.col:inside.col1 - inst.col] = False
    (piece,), origin, nonempty = tight([mask], np.array([[inst.row, inst.col]]))
    return replace(inst, row=int(origin[0, 0]), col=int(origin[0, 1]), mask=piece) if nonempty[0] else None


def resolve(instances: list[Instance], pairs: list[tuple[int, int]], grid: WindowGrid,
            rule: SeamRule) -> list[MergedObject]:
    """The objects a component of detections shows (`components`: the members and their candidate pairs), by
    the rule of the module docstring; nothing outside a component could change its result."""
    if len(instances) == 1:  # most components: one detection, whole or standing alone or yielding
        (only,) = instances
        return [merged(instances, only)] if is_whole(only, grid, rule) or stands_alone(instances, grid, rule) else []
    weight = {(i, j): agreement(instances[i], instances[j], rule) for i, j in pairs}
    matched = [(i, j) for (i, j), w in weight.items() if w]
    room = [edge_room(inst, grid) for inst in instances]
    whole = [r > rule.edge_margin for r in room]
    groups = clusters(len(instances), [(i, j) for i, j in matched if whole[i] == whole[j]])
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    joined: dict[int, list[int]] = {g: [] for g, members in enumerate(groups) if whole[members[0]]}
    objects = []
    for g, members in enumerate(groups):
        if whole[members[0]]:
            continue
        # A truncated group joins the whole object it shares the most pixels with, or yields, or stands.
        ties: dict[int, int] = {}
        for (i, j), w in weight.items():
            if w and whole[i] != whole[j] and group_of[i if not whole[i] else j] == g:
                target = group_of[j if not whole[i] else i]
                ties[target] = ties.get(target, 0) + w
        if ties:
            joined[max(ties, key=lambda t: (ties[t], -t))] += members
            continue
        parts = [instances[i] for i in members]
        if stands_alone(parts, grid, rule):
            objects.append(merged(parts, None))
    for g, extra in joined.items():
        views = [instances[i] for i in groups[g]]
        view = instances[max(groups[g], key=lambda i: (room[i], instances[i].score, -instances[i].tile,
                                                       -instances[i].position))]
        parts = views + [instances[i] for i in extra]
        ground = whole_ground(view.window, grid, rule)
        beyond = [piece for p in parts if not ground.contains(p.box)
                  for piece in [outside(p, ground)] if piece is not None]
        objects.append(merged(parts, view, beyond))
    return sorted(objects, key=lambda o: o.key)


def merge_scene(instances: list[Instance], grid: WindowGrid, rule: SeamRule) -> list[MergedObject]:
    """Every object of a scene's detections at once, in output order: what the streamed `SceneMerge` and the
    workers' `settle_tile` give together, by construction (and checked by the tests)."""
    found = [o for component, pairs in components(instances, rule)
             for o in resolve([instances[i] for i in component], pairs, grid, rule)]
    return sorted(found, key=lambda o: o.key)


def merged(members: list[Instance], view: Instance | None, beyond: list[Instance] | None = None) -> MergedObject:
    """The object of `members`: outlined by `view` with the pieces of the others `beyond` the ground where
    it is whole, or by the union of the members (by the one member itself when there is one); class and
    score of the best-scoring member."""
    best = max(members, key=lambda m: (m.score, -m.tile, -m.position))
    if view is None and len(members) == 1:
        view = members[0]
    pieces = members if view is None else [view, *beyond] if beyond else []
    return MergedObject(key=min(m.key for m in members), view=None if pieces else view, parts=members,
                        score=best.score, label=best.label, pieces=pieces)


def settle_tile(instances: list[Instance], grid: WindowGrid, tile: int,
                rule: SeamRule) -> tuple[list[MergedObject], list[Instance]]:
    """One window's detections as soon as it is done: (final objects, detections left for the scene merge).

    Detections that may interact only with each other, all inside the window's private region (pixels no
    other window sees, `rule.reach` clear of them), form components no other window's detection can join:
    the scene-wide merge would resolve them exactly as here, so they are final now and are polygonized in
    the worker. Every other detection is returned as it is, so the scene merge sees what it would have seen.
    """
    private = grid.private(grid[tile], rule.reach)
    final: list[MergedObject] = []
    pending: list[Instance] = []
    for component, pairs in components(instances, rule):
        members = [instances[i] for i in component]
        if all(private.contains(m.box) for m in members):
            final += resolve(members, pairs, grid, rule)
        else:
            pending += members
    return final, pending


@dataclass
class Group:
    """Held detections that may show one object (candidate pairs, transitively): a component of the scene's
    detections as far as the windows done so far tell."""

    members: list[int]  # detection ids
    pairs: list[tuple[int, int]]  # candidate pairs, by id
    missing: int = 0  # (member, window not done yet that could hold a partner of it): none left = ready


class SceneMerge:
    """A scene's seam merge, streamed: detections are resolved as soon as every window that could hold a
    partner is done, so the driver's work and memory follow the tiles in flight, not the scene's size.

    `take` adds one finished window (its final rows from the worker, and its pending detections with the
    rows of their own outlines); `flush` returns the rows whose place in the output is settled, in output
    order (window index, then position), the same whatever order the tiles arrive in. `polygonize` turns
    the objects united from several views (the rare ones no window saw whole) into rows.

    Each detection is looked at once when its window arrives: paired with the held detections of the
    windows around it (candidate pairs, as `components` finds them over a whole scene), its group joined
    with theirs (union-find), and counted as waiting for each window not done yet that could hold a
    partner. A group no window is missing for is a component of the whole scene's detections: it is
    resolved as `merge_scene` would resolve it.
    """

    def __init__(self, grid: WindowGrid, rule: SeamRule, polygonize: Callable[[list[MergedObject]], Rows]):
        self.grid, self.rule, self.polygonize = grid, rule, polygonize
        self.done = np.zeros((len(grid.rows), len(grid.cols)), dtype=bool)
        self.first_not_done = 0
        self.held: dict[int, Instance] = {}  # pending detections by id, until resolved
        self.by_window: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # window -> its detections' (ids, boxes)
        self.unresolved: dict[int, int] = {}  # window -> how many of its detections are held
        self.parent: dict[int, int] = {}  # union-find over held ids; a root names its group
        self.groups: dict[int, Group] = {}
        self.waiting_on: dict[int, list[int]] = {}  # window -> held ids a partner of which it could hold
        self.ready: set[int] = set()  # roots of groups to resolve at the next flush
        self.next_id = 0
        self.own: dict[tuple[int, int], tuple[bytes, float]] = {}  # a pending detection's own outline and area
        self.settled: dict[int, list[Rows]] = {}  # rows by window index, until the frontier passes it
        self.objects = 0

    def take(self, tile: int, final: Rows, pending: list[Instance], pending_rows: Rows) -> None:
        self.done.flat[tile] = True
        while self.first_not_done < len(self.grid) and self.done.flat[self.first_not_done]:
            self.first_not_done += 1
        self.hold(final)
        self.objects += len(final)
        self.own.update(zip(map(tuple, pending_rows.keys.tolist()), zip(pending_rows.wkb, pending_rows.areas)))
        touched = self.add(tile, pending) + self.waiting_on.pop(tile, [])
        for i in touched[len(pending):]:
            self.groups[self.root(i)].missing -= 1
        self.ready.update(r for r in {self.root(i) for i in touched} if self.groups[r].missing == 0)

    def add(self, tile: int, pending: list[Instance]) -> list[int]:
        """Hold a window's pending detections, pair them with their possible partners and count the windows
        they wait for; their ids."""
        if not pending:
            return []
        ids = list(range(self.next_id, self.next_id + len(pending)))
        self.next_id += len(pending)
        boxes = np.array([m.box.tuple() for m in pending], dtype=np.int64)
        self.held.update(zip(ids, pending))
        self.by_window[tile] = (np.array(ids), boxes)
        self.unresolved[tile] = len(ids)
        # Partners lie in the windows around this one, with boxes within the rule's reach of it.
        near = self.grid[tile].grown(self.rule.reach)
        others: list[int] = []
        for w in self.grid.seen_by(near):
            if w != tile and w in self.by_window:
                w_ids, b = self.by_window[w]
                close = (b[:, 0] < near.col1) & (b[:, 2] > near.col0) & (b[:, 1] < near.row1) & (b[:, 3] > near.row0)
                others += [i for i in w_ids[close].tolist() if i in self.held]
        # Register each new detection as waiting for the windows not done yet that could hold a partner.
        grown = boxes + np.array([-1, -1, 1, 1]) * self.rule.reach
        c0, c1, r0, r1 = self.grid.spans(grown)
        cols = len(self.grid.cols)
        for i, row0, row1, col0, col1 in zip(ids, r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist()):
            self.parent[i] = i
            group = self.groups[i] = Group([i], [])
            for w in (r * cols + c for r in range(row0, row1) for c in range(col0, col1)):
                if not self.done.flat[w]:
                    self.waiting_on.setdefault(w, []).append(i)
                    group.missing += 1
        everyone = ids + others
        pairs = candidate_pairs([self.held[i] for i in everyone], self.rule)
        for i, j in pairs[pairs[:, 0] < len(ids)].tolist():  # (i < j): pairs among `others` are known
            self.union(everyone[i], everyone[j])
        return ids

    def root(self, i: int) -> int:
        return find(self.parent, i)

    def union(self, i: int, j: int) -> None:
        ri, rj = self.root(i), self.root(j)
        if ri != rj:
            if len(self.groups[ri].members) < len(self.groups[rj].members):
                ri, rj = rj, ri
            self.parent[rj] = ri
            big, small = self.groups[ri], self.groups.pop(rj)
            big.members += small.members
            big.pairs += small.pairs
            big.missing += small.missing
        self.groups[ri].pairs.append((i, j))

    def hold(self, rows: Rows) -> None:
        """Keep rows until the frontier passes their window."""
        if not len(rows):
            return
        tiles = rows.keys[:, 0]
        if (tiles == tiles[0]).all():  # a window's final rows: the common case
            self.settled.setdefault(int(tiles[0]), []).append(rows)
            return
        for tile in np.unique(tiles).tolist():
            self.settled.setdefault(tile, []).append(rows.take(np.flatnonzero(rows.keys[:, 0] == tile)))

    def flush(self, last: bool = False) -> Rows:
        """Rows now in their final place; with `last`, everything (every window is done or has failed)."""
        ready = list(self.groups) if last else self.ready
        self.ready = set()
        if ready:
            self.resolve_groups(ready)
        frontier = len(self.grid) if last else min(self.first_not_done, min(self.unresolved, default=len(self.grid)))
        released = sorted(t for t in self.settled if t < frontier)
        return Rows.concat([rows for t in released for rows in self.settled.pop(t)]).sorted()

    def resolve_groups(self, roots: Iterable[int]) -> None:
        """Resolve the groups of `roots` (`resolve`, members in output order) and hold their rows."""
        found: list[MergedObject] = []
        keys: list[tuple[int, int]] = []
        for r in roots:
            group = self.groups.pop(r)
            members = sorted(group.members, key=lambda i: self.held[i].key)
            local = {i: k for k, i in enumerate(members)}
            instances = [self.held.pop(i) for i in members]
            keys += [inst.key for inst in instances]
            for i, inst in zip(members, instances):
                del self.parent[i]
                self.unresolved[inst.tile] -= 1
                if not self.unresolved[inst.tile]:
                    del self.unresolved[inst.tile], self.by_window[inst.tile]
            pairs = [(min(local[i], local[j]), max(local[i], local[j])) for i, j in group.pairs]
            found += resolve(instances, pairs, self.grid, self.rule)
        # A view's own outline is missing when the worker left it out (under the minimum area, or nothing left
        # after a repair): its object is left out the same way.
        single = [o for o in found if o.view is not None and o.view.key in self.own]
        self.hold(Rows(np.array([o.key for o in single], dtype=np.int64).reshape(-1, 2),
                       [self.own[o.view.key][0] for o in single],
                       np.array([o.label for o in single], dtype=np.int64),
                       np.array([o.score for o in single], dtype=np.float64),
                       np.array([self.own[o.view.key][1] for o in single], dtype=np.float64)))
        self.hold(self.polygonize([o for o in found if o.view is None]))
        self.objects += len(found)
        for key in keys:
            self.own.pop(key, None)
