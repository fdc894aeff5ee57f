"""Seams under a perturbed model: what the seam merge makes of a real model's views, before and after.

The model of tests/perturbed.py (each window's views of the true objects grown or shrunk by up to 2 px, its
own draw; scores in [0.6, 1]; none or 20 % of views in the other class) on seam scenes of 3 x 3 windows,
tiles of 512, 256 and 128 px with overlap 64, 16 and 0, a few seeds each. Two ways a view of an object cut
by a window's edge can come out: reaching the edge (the object's outline grown or shrunk, then cut), or
shrunk with the rest (so it may stop up to 2 px short of the edge; without overlap such a view cannot be
told from a neighbour across the seam line: the rule's known limit, measured too). Per case: true objects,
merged objects, and how many came out once, as slivers, doubled, missed or glued, and the worst outline
distance (px).

The same detections go through the merge of this checkout and of each `--compare` commit: its `pipeline`
and `model` packages are extracted (git archive) into a temporary folder and run in a child process, called
through its own API (`merge_scene`, or `merge_instances` before the streaming merge).

    python -m tests.benchmarks.bench_seams [--seeds 5] [--compare 42e39a4 a56000f]
"""

from __future__ import annotations

import argparse
import pickle
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TILES, OVERLAPS = (512, 256, 128), (64, 16, 0)
FIELDS = ("merged", "once", "slivers", "doubled", "missed", "glued", "outline")


def merge_here(code: str, cases: list[dict]) -> tuple[str, list[list[tuple]]]:
    """The merge of the `pipeline` package in `code` (this checkout, or in a child process a compared
    commit's packages): what it is, and every case's merged outlines (row, col, mask)."""
    sys.path.insert(0, code)
    from pipeline import instances, merge

    assert Path(merge.__file__).resolve().is_relative_to(Path(code).resolve()), merge.__file__

    out = []
    for case in cases:
        if hasattr(merge, "merge_scene"):  # the streaming merge: windows as Rects, a WindowGrid, a SeamRule
            from pipeline.rect import Rect
            from pipeline.windows import plan_windows

            grid = plan_windows(case["width"], case["height"], case["tile"], case["overlap"])
            views = [instances.Instance(row=r, col=c, mask=m, score=s, label=lab, window=Rect(*w), tile=t,
                                        position=p) for r, c, m, s, lab, w, t, p in case["views"]]
            merged = merge.merge_scene(views, grid, merge.SeamRule(class_agnostic=case["class_agnostic"]))
            out.append([(row, col, mask) for mask, row, col in (o.mask() for o in merged)])
        else:  # before it (42e39a4): one call on every detection, windows as (col, row, width, height)
            views = [instances.Instance(row=r, col=c, mask=m, score=s, label=lab, window=(w[0], w[1], w[2] - w[0],
                                        w[3] - w[1])) for r, c, m, s, lab, w, t, p in case["views"]]
            out.append([(o.row, o.col, o.mask) for o in merge.merge_instances(views, 0.5, 0.8)])
    if hasattr(merge, "merge_scene"):
        return "the streaming merge and truncated-view rule as they were there", out
    return "before the truncated-view rule: mask agreement alone, views of one class only", out


def merged_by(rev: str, cases: list[dict]) -> tuple[str, list[list[tuple]]]:
    """The merge of commit `rev` on the cases, in a child process (its packages, not this checkout's)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev, "pipeline", "model"], cwd=REPO, capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / "cases.pkl").write_bytes(pickle.dumps(cases))
        subprocess.run([sys.executable, __file__, "--child", tmp], check=True, cwd=tmp)
        return pickle.loads((Path(tmp) / "merged.pkl").read_bytes())


def short(rev: str) -> str:
    return subprocess.run(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def make_cases(seeds: int) -> list[dict]:
    """Every (class flips, cut views, tile, overlap, seed) scene with its detections, once per class_agnostic."""
    from tests.perturbed import FLIP, perturbed_model, seam_scene

    cases = []
    for flip in (0.0, FLIP):
        for shrink in (False, True):
            for tile in TILES:
                for overlap in OVERLAPS:
                    for seed in range(seeds):
                        grid, objects = seam_scene(tile, overlap, seed)
                        raw = perturbed_model(grid, objects, seed, flip=flip, cut_views_shrink=shrink)
                        views = [(v.row, v.col, v.mask, v.score, v.label, v.window.tuple(), v.tile, v.position)
                                 for v in raw]
                        cases += [dict(width=grid.width, height=grid.height, tile=tile, overlap=overlap, flip=flip,
                                       shrink=shrink, class_agnostic=agnostic, views=views, truth=objects)
                                  for agnostic in (True, False)]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--compare", nargs="*", default=["42e39a4"], help="commits whose merge to run too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        cases = pickle.loads((Path(args.child) / "cases.pkl").read_bytes())
        (Path(args.child) / "merged.pkl").write_bytes(pickle.dumps(merge_here(args.child, cases)))
        return

    sys.path.insert(0, str(REPO))
    from tests.benchmarks.common import publish
    from tests.perturbed import FLIP, JITTER, Tally, tally

    cases = make_cases(args.seeds)
    changed = subprocess.run(["git", "status", "--porcelain", "pipeline"], cwd=REPO, capture_output=True, text=True)
    here = short("HEAD") + (" + changes" if changed.stdout.strip() else "")
    runs = {here: merge_here(str(REPO), cases)}
    for rev in args.compare:
        runs[short(rev)] = merged_by(rev, [{k: v for k, v in c.items() if k != "truth"} for c in cases])
    columns = [(rev, True) for rev in runs if rev != here] + [(here, True), (here, False)]
    titles = [f"{rev}, agnostic {str(agnostic).lower()}" if rev == here else rev for rev, agnostic in columns]
    lines = [f"Perturbed model (tests/perturbed.py): views grown or shrunk by up to {JITTER} px per window, scores "
             f"in [0.6, 1]; scenes of 3 x 3 windows; {args.seeds} seeds per case, counts summed over them.",
             f"Merges: {here}: this checkout (after), merge.class_agnostic true (default) and false"
             + "".join(f"; {rev}: {runs[rev][0]}" for rev in runs if rev != here) + ".",
             "Per merge: merged objects, once, slivers, doubled, missed, glued, worst outline distance (px, "
             "chessboard Hausdorff; 2 = within the jitter); true objects in the third column."]
    for flip in (0.0, FLIP):
        for shrink in (False, True):
            lines += ["", f"{flip:.0%} of views in the other class, cut views "
                      + ("may stop up to 2 px short of the window's edge (overlap 0: the known limit, such a view "
                         "and a neighbour across the seam line look alike)" if shrink else "reach the window's edge"),
                      f"{'tile':>4} {'ovl':>3} {'true':>4} | " + " | ".join(f"{t:^27}" for t in titles)]
            for tile in TILES:
                for overlap in OVERLAPS:
                    cells = []
                    for rev, agnostic in columns:
                        total = Tally()
                        for c, merged in zip(cases, runs[rev][1]):
                            if (c["tile"], c["overlap"], c["flip"], c["shrink"], c["class_agnostic"]) == (
                                    tile, overlap, flip, shrink, agnostic):
                                total += tally(c["truth"], merged)
                        cells.append(" ".join(f"{int(getattr(total, f)):>3}" for f in FIELDS))
                    lines.append(f"{tile:>4} {overlap:>3} {total.truths:>4} | " + " | ".join(cells))
    publish("Seams under a perturbed model", "python -m tests.benchmarks.bench_seams " + " ".join(sys.argv[1:]),
            lines)


if __name__ == "__main__":
    main()
