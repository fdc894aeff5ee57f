"""Scenes flow into each other: a many-scene job gives exactly what running the scenes one by one gives,
keeps the workers busy across a scene boundary, and resumes with every row."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyogrio
from affine import Affine

from pipeline.batch import run_scenes
from pipeline.run import run_scene
from tests.oracle import OraclePredictor, paint_objects, write_scene

TILE, OVERLAP = 128, 32
OPTIONS = {"tile": TILE, "overlap": OVERLAP, "scaling": "divide255", "progress": False}


class SlowOracle(OraclePredictor):
    """The oracle taking a fixed time per tile, as a model does."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, images):
        time.sleep(self.seconds * len(images))
        return super().__call__(images)


def scene(path: Path, height: int, width: int, x0: float) -> str:
    ids, classes = paint_objects(height, width, TILE, OVERLAP)
    write_scene(path, ids, classes, "EPSG:32616", Affine(0.5, 0, x0, 0, -0.5, 3725140.0))
    return str(path)


def rows(path: Path) -> list[tuple]:
    """Every row in file order: geometry, class, score, area."""
    frame = pyogrio.read_dataframe(path)
    return [(g.wkb, r.class_id, r.class_name, round(float(r.score), 6), round(float(r.area_m2), 6))
            for g, r in zip(frame.geometry, frame.itertuples())]


def test_a_two_scene_job_equals_the_scenes_one_by_one_and_keeps_the_workers_busy(tmp_path, ray_session):
    first = scene(tmp_path / "first.tif", 250, 250, 733600.0)
    second = scene(tmp_path / "second.tif", 200, 300, 734000.0)
    alone = tmp_path / "alone"
    alone.mkdir()
    for s in (first, second):
        run_scene(s, alone / f"{Path(s).stem}.gpkg", predictor=OraclePredictor(), **OPTIONS)
    job = tmp_path / "job"
    job.mkdir()
    # 9 windows in the first scene, batches of 4: the third batch holds its last window and the second
    # scene's first three, which the model computes together.
    summaries = list(run_scenes([first, second], SlowOracle(0.25), None, out_dir=job, batch_size=4, workers=1,
                                threads_per_worker=1, **OPTIONS))
    for s in (first, second):
        name = f"{Path(s).stem}.gpkg"
        assert rows(job / name) == rows(alone / name) and len(rows(job / name)) > 5
    one, two = summaries
    assert one.complete and two.complete
    # The second scene's first tile was computed while the first scene was still being merged and written.
    assert two.timeline["first_tile"] < one.timeline["written"]


class CountingOracle(OraclePredictor):
    """The oracle, appending the size of each batch it is given to a file (model workers are processes)."""

    def __init__(self, log: str):
        self.log = log

    def __call__(self, images):
        with open(self.log, "a") as log:
            log.write(f"{len(images)}\n")
        return super().__call__(images)


def test_the_job_ends_in_smaller_batches_so_the_workers_finish_together(tmp_path, ray_session):
    """With equal batches to the end, one worker waits up to a whole batch for the other's last. The last
    scene's end goes out in smaller batches (`pool.batch_size_at`), with the same rows; one worker keeps
    full batches."""
    from pipeline.pool import batch_size_at

    assert [batch_size_at(left, 8, 2, 2) for left in (500, 48, 30, 12, 6, 1)] == [8, 8, 5, 2, 1, 1]
    assert {batch_size_at(left, 8, 1, 2) for left in range(1, 60)} == {8}
    first = scene(tmp_path / "first.tif", 250, 250, 733600.0)  # 9 windows
    second = scene(tmp_path / "second.tif", 200, 300, 734000.0)  # 6 windows
    alone = tmp_path / "alone"
    alone.mkdir()
    for s in (first, second):
        run_scene(s, alone / f"{Path(s).stem}.gpkg", predictor=OraclePredictor(), **OPTIONS)
    for workers in (1, 2):
        job, log = tmp_path / f"job{workers}", tmp_path / f"sizes{workers}"
        job.mkdir()
        list(run_scenes([first, second], CountingOracle(str(log)), None, out_dir=job, batch_size=4,
                        workers=workers, threads_per_worker=1, **OPTIONS))
        for s in (first, second):
            assert rows(job / f"{Path(s).stem}.gpkg") == rows(alone / f"{Path(s).stem}.gpkg")
        sizes = sorted((int(line) for line in log.read_text().split()), reverse=True)
        # The first scene in full batches; then 15 - 8 = 7 tiles left for 2 workers x 3 batches each.
        assert sizes == ([4, 4, 4, 3] if workers == 1 else [4, 4, 2, 1, 1, 1, 1, 1])


class QuitAfter(OraclePredictor):
    """The oracle that stops working (raises) after a number of tiles while a flag file exists: a run that
    fails part-way, keeping the tiles it finished."""

    def __init__(self, flag: str, tiles: int):
        self.flag, self.tiles, self.seen = flag, tiles, 0

    def __call__(self, images):
        self.seen += len(images)
        if os.path.exists(self.flag) and self.seen > self.tiles:
            raise RuntimeError("stopped on purpose")
        return super().__call__(images)


def test_a_resumed_run_writes_the_rows_of_its_saved_tiles(tmp_path, ray_session):
    """Objects wholly inside the first windows are settled there; resumed from saved tiles, their rows must
    be written like any other (they are released while the saved tiles are replayed)."""
    height, width = 200, 420
    ids = np.zeros((height, width), dtype=np.uint8)
    classes = np.zeros_like(ids)
    for k, (r, c) in enumerate([(20, 20), (20, 60), (40, 40), (150, 380), (90, 200)]):  # 3 private to window 0
        ids[r:r + 12, c:c + 15] = k + 1
        classes[r:r + 12, c:c + 15] = 1
    path = tmp_path / "sparse.tif"
    write_scene(path, ids, classes, "EPSG:32616", Affine(0.5, 0, 733600.0, 0, -0.5, 3725140.0))
    reference = tmp_path / "reference.gpkg"
    run_scene(str(path), reference, predictor=OraclePredictor(), **OPTIONS)
    flag = tmp_path / "stop"
    flag.touch()
    out = tmp_path / "out.gpkg"
    predictor = QuitAfter(str(flag), tiles=2)
    partial = run_scene(str(path), out, predictor=predictor, batch_size=1, workers=1, **OPTIONS)
    saved = partial.tiles - len(partial.failed)  # 2 computed, and the blank windows (no-data: never computed)
    assert not partial.complete and saved - partial.tiles_nodata == 2
    flag.unlink()
    resumed = run_scene(str(path), out, predictor=predictor, batch_size=1, workers=1, **OPTIONS)
    assert resumed.complete and resumed.tiles_resumed == saved
    assert sorted(rows(out)) == sorted(rows(reference)) and len(rows(out)) == 5


def test_the_progress_bar_counts_the_detections_of_the_whole_job(tmp_path, ray_session, capsys):
    """It counted only the scenes still under way, so it ended at 0 once the last scene was handed over."""
    first = scene(tmp_path / "first.tif", 250, 250, 733600.0)
    second = scene(tmp_path / "second.tif", 200, 300, 734000.0)
    summaries = list(run_scenes([first, second], OraclePredictor(), None, out_dir=tmp_path,
                                **{**OPTIONS, "progress": True}))
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    total = sum(s.raw_instances for s in summaries)
    assert total > 10 and bar.endswith(f"detections={total}]")


def test_a_scene_reads_its_overview_once_its_first_tile_is_in(tmp_path):
    """Planned scenes start no overview read (at a job's start it takes CPU from the first batches' reads);
    the first written tile sends it to run (`side`); a percentile scaling reads it to plan."""
    from core.cluster import SideCall
    from pipeline.features import Rows
    from pipeline.scene_run import SceneRun, SceneTask
    from pipeline.settings import load_settings, settings_overrides

    path = scene(tmp_path / "a.tif", 200, 200, 733600.0)
    runs, sent = {}, []

    def side(fn, *args):
        sent.append(fn.__name__)
        return SideCall.here(fn, *args)

    for scaling in ("divide255", "percentile"):
        settings = load_settings(None, settings_overrides({"tile": TILE, "overlap": OVERLAP, "scaling": scaling}))
        task = SceneTask(path, tmp_path / f"{scaling}.gpkg", scaling, tmp_path / scaling)
        runs[scaling] = run = SceneRun(0, task, settings, {"predictor": "test"}, lambda summary: {}, None, side)
        assert run.plan()
        assert sent == ["first_look"] * (scaling == "percentile")
    lazy, planned = runs["divide255"], runs["percentile"]
    assert lazy.look.call is None and lazy.look.result is None
    assert planned.look.result is not None
    lazy.write(Rows.empty())
    assert sent == ["first_look"] * 2 and lazy.look.call is not None and lazy.failure is None
    overview, _ = lazy.look()
    assert overview is not None and overview.data.shape[1:] == (200, 200)
    for run in runs.values():
        run.abort()
