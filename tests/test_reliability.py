"""Reliability of `run`: a killed worker, Ctrl-C and resume, stale state, bad input through the CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.cli import main
from pipeline.run import run_scene
from pipeline.store import saved_tiles, state_dir
from tests.oracle import OraclePredictor, paint_objects, write_scene

TILE, OVERLAP = 128, 32
UTM = ("EPSG:32616", Affine(0.5, 0, 733600.0, 0, -0.5, 3725140.0))
REPO = Path(__file__).resolve().parents[1]


class SlowOracle(OraclePredictor):
    """The oracle, slowed down so a test can kill or interrupt it mid-run; it records worker pids and, given
    `calls`, appends a line to that file as each call starts."""

    def __init__(self, seconds: float, pid_dir: str, calls: str | None = None):
        self.seconds, self.pid_dir, self.calls = seconds, pid_dir, calls

    def __call__(self, images):
        Path(self.pid_dir, str(os.getpid())).touch()
        if self.calls:
            with open(self.calls, "a") as log:
                log.write(f"{len(images)}\n")
        time.sleep(self.seconds)
        return super().__call__(images)


@pytest.fixture
def scene(tmp_path) -> Path:
    ids, classes = paint_objects(260, 300, TILE, OVERLAP)
    path = tmp_path / "scene.tif"
    write_scene(path, ids, classes, *UTM)
    return path


def features(path: Path) -> list[tuple]:
    frame = gpd.read_file(path)
    return sorted((r.class_id, round(r.score, 5), round(r.area_m2, 3), r.geometry.normalize().wkb_hex)
                  for r in frame.itertuples())


def test_killed_worker_gives_the_same_output(tmp_path, scene, ray_session):
    reference = tmp_path / "reference.gpkg"
    run_scene(str(scene), reference, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
              scaling="divide255", progress=False)

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    killed = []

    def kill_first_worker():
        deadline = time.time() + 60
        while time.time() < deadline and not any(pid_dir.iterdir()):
            time.sleep(0.05)
        pid = int(next(pid_dir.iterdir()).name)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    out = tmp_path / "out.gpkg"
    summary = run_scene(str(scene), out, predictor=SlowOracle(0.5, str(pid_dir)), tile=TILE, overlap=OVERLAP,
                        scaling="divide255", batch_size=1, workers=2, threads_per_worker=1, progress=False)
    killer.join()
    assert killed
    assert summary.complete and summary.resubmitted_tiles >= 1, summary.failed
    assert features(out) == features(reference)


def test_side_jobs_run_in_a_model_worker_beside_its_batch_and_here_once_it_is_lost(tmp_path, scene, ray_session):
    """A scene's short jobs (overview read, quicklook) go to a model worker's side thread: they neither wait
    for the batch in its model nor start a process of their own; a lost worker's job is done by the driver."""
    import ray

    from pipeline.pool import RayPool
    from pipeline.raster import open_scene
    from pipeline.scene_run import scene_spec
    from pipeline.settings import load_settings, settings_overrides

    settings = load_settings(None, settings_overrides({"tile": TILE, "overlap": OVERLAP, "workers": 1,
                                                      "threads_per_worker": 1, "scaling": "divide255"}))
    spec = scene_spec(str(scene), open_scene(str(scene)), settings, lambda: (None, []))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    with RayPool(SlowOracle(3.0, str(pid_dir)), settings) as pool:
        batch = pool.actors[0].process.remote({0: spec}, [(0, 0)])
        while not any(pid_dir.iterdir()):  # the batch is in the model
            time.sleep(0.02)
        (model_pid,) = (int(p.name) for p in pid_dir.iterdir())
        assert pool.side(os.getpid).result() == model_pid
        assert not ray.wait([batch], timeout=0)[0]  # it came back while the model still ran
        ray.kill(pool.actors[0])
        assert pool.side(os.getpid).result() == os.getpid()


INTERRUPTIBLE = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {repo!r})
    from tests.test_reliability import SlowOracle
    from pipeline.cli import _raise_interrupt
    from core.errors import Interrupted
    from pipeline.run import run_scene
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        run_scene({scene!r}, {out!r}, predictor=SlowOracle({seconds}, {pids!r}, {calls!r}), tile={tile},
                  overlap={overlap}, scaling="divide255", batch_size=1, workers=1, progress=False)
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        sys.exit(130)
""")


def test_sigterm_then_rerun_resumes_to_the_same_output(tmp_path, scene, ray_session):
    reference = tmp_path / "reference.gpkg"
    run_scene(str(scene), reference, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
              scaling="divide255", progress=False)
    out = tmp_path / "out.gpkg"
    pids = tmp_path / "pids"
    pids.mkdir()
    calls = tmp_path / "calls"
    script = INTERRUPTIBLE.format(repo=str(REPO), scene=str(scene), out=str(out), seconds=0.8, pids=str(pids),
                                  calls=str(calls), tile=TILE, overlap=OVERLAP)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    store = state_dir(out)
    deadline = time.time() + 120
    while time.time() < deadline and saved_tiles(store) < 2 and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130, err
    # It stopped where it was: the model was not asked for the rest of the scene (one tile per call; the
    # signal came with 2 saved, a few more may have been under way). Not a wall-clock bound: Ray's shutdown
    # and the interpreter's exit take from 2 s to over 10 s with the machine's load.
    total = int(re.search(r"of (\d+) tiles saved", err)[1])
    assert len(calls.read_text().splitlines()) < total
    assert "tiles saved" in err and not out.exists()
    saved = saved_tiles(store)
    assert saved >= 2

    summary = run_scene(str(scene), out, predictor=SlowOracle(0.8, str(pids), str(calls)), tile=TILE, overlap=OVERLAP,
                        scaling="divide255", batch_size=1, workers=1, progress=False)
    assert summary.tiles_resumed == saved and not summary.stale_state_cleared
    assert features(out) == features(reference)
    assert not store.exists()  # a complete run leaves nothing behind


def test_saved_tiles_of_another_model_or_scene_are_stale(tmp_path, scene):
    from pipeline.features import Rows
    from pipeline.instances import Instance, InstanceBlock
    from pipeline.rect import Rect
    from pipeline.store import TileStore
    from pipeline.worker import TileOutput

    directory = tmp_path / "state"
    store = TileStore(directory, "key-1")
    mask = np.array([[True, False], [True, True]])
    window = Rect(0, 0, 64, 64)
    pending = InstanceBlock.of([Instance(row=5, col=7, mask=mask, score=0.5, label=2, window=window, position=4)])
    final = Rows(np.array([[3, 0]]), [b"\x01wkb"], np.array([1]), np.array([0.9]), np.array([12.5]))
    store.save(TileOutput(0, 3, "ok", final=final, pending=pending, pending_rows=Rows.empty(),
                          dropped=np.arange(10), best_dropped=0.3))
    (saved,) = TileStore(directory, "key-1").saved(scene=7)
    (inst,) = saved.pending.instances(window, 3)
    assert saved.index == 3 and saved.scene == 7 and np.array_equal(inst.mask, mask)
    assert (inst.row, inst.col, inst.label, inst.position, inst.tile) == (5, 7, 2, 4, 3)
    assert saved.final.wkb == [b"\x01wkb"] and list(saved.final.areas) == [12.5] and saved.best_dropped == 0.3
    assert list(saved.dropped) == list(range(10))
    fresh = TileStore(directory, "key-2")
    assert fresh.stale and list(fresh.saved(0)) == []


def test_a_saved_tile_cut_short_by_a_crash_is_dropped_and_the_log_stays_readable(tmp_path):
    from pipeline.store import LOG, TileStore
    from pipeline.worker import TileOutput

    directory = tmp_path / "state"
    store = TileStore(directory, "key")
    for index in (4, 2):
        store.save(TileOutput(0, index, "nodata"))
    store.close()
    whole = (directory / LOG).stat().st_size
    with open(directory / LOG, "ab") as log:  # a record whose writing was killed half-way
        log.write((5000).to_bytes(8, "little") + b"\x00" * 100)
    again = TileStore(directory, "key")
    assert [t.index for t in again.saved(0)] == [4, 2] and saved_tiles(directory) == 2
    again.save(TileOutput(0, 7, "nodata"))  # appended after the last whole record, the torn one cut off
    again.close()
    assert (directory / LOG).stat().st_size > whole
    assert [t.index for t in TileStore(directory, "key").saved(0)] == [4, 2, 7]
    with open(directory / LOG, "r+b") as log:  # a length no file could hold: read as cut short, not trusted
        log.seek(whole)
        log.write((2**62).to_bytes(8, "little"))
    assert [t.index for t in TileStore(directory, "key").saved(0)] == [4, 2]


def write_raster(path: Path, **profile) -> None:
    base = dict(driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:32616",
                transform=Affine(1, 0, 500000, 0, -1, 4000000))
    base.update(profile)
    data = np.zeros((base["count"], base["height"], base["width"]), dtype=base["dtype"])
    with rasterio.open(path, "w", **base) as dst:
        dst.write(data)


def cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_bad_inputs_get_one_line_and_no_output(tmp_path, capsys):
    out = tmp_path / "out.gpkg"
    ckpt = tmp_path / "model.pt"
    code, err = cli(["run", str(tmp_path / "missing.tif"), "-o", str(out)], capsys)
    assert code == 2 and "--checkpoint" in err and len(err.strip().splitlines()) == 1

    code, err = cli(["run", str(tmp_path / "x.tif"), "--checkpoint", str(ckpt), "-o", str(out)], capsys)
    assert code == 2 and "model.pt" in err and "not found" in err and len(err.strip().splitlines()) == 1

    code, err = cli(["run", "x.tif", "--checkpoint", str(ckpt), "--tile", "64", "--overlap", "64"], capsys)
    assert code == 2 and "overlap" in err
    code, err = cli(["run", "x.tif", "--checkpoint", str(ckpt), "--batch-size", "-3"], capsys)
    assert code == 2 and "batch_size" in err
    assert not out.exists()


def test_bad_scenes_are_refused_before_any_work(tmp_path, ray_session):
    text = tmp_path / "notes.tif"
    text.write_text("this is not a GeoTIFF")
    nocrs = tmp_path / "nocrs.tif"
    write_raster(nocrs, crs=None)
    truncated = tmp_path / "truncated.tif"
    write_raster(truncated, width=256, height=256)
    truncated.write_bytes(truncated.read_bytes()[:3000])
    from core.errors import UserError

    for scene, pattern in [(tmp_path / "missing.tif", "missing.tif"), (text, "notes.tif"),
                           (nocrs, "nocrs.tif"), (truncated, "truncated.tif")]:
        out = tmp_path / f"{scene.stem}.gpkg"
        with pytest.raises(UserError, match=pattern):
            run_scene(str(scene), out, predictor=OraclePredictor(), progress=False)
        assert not out.exists() and not state_dir(out).exists()


def test_existing_output_is_refused_without_overwrite(tmp_path, scene, ray_session):
    out = tmp_path / "out.gpkg"
    out.write_text("previous result")
    from core.errors import UserError

    with pytest.raises(UserError, match="exists"):
        run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP, progress=False)
    assert out.read_text() == "previous result"
    run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP, scaling="divide255",
              overwrite=True, progress=False)
    assert len(gpd.read_file(out)) > 0


def test_all_nodata_scene_gives_a_valid_empty_layer(tmp_path, ray_session):
    scene = tmp_path / "empty.tif"
    write_raster(scene, count=3, nodata=0, width=200, height=150)
    out = tmp_path / "empty.gpkg"
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP, progress=False)
    assert summary.complete and summary.tiles_nodata == summary.tiles
    frame = gpd.read_file(out)
    assert len(frame) == 0 and {"class_name", "class_id", "score", "area_m2"} <= set(frame.columns)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_uint16_and_float32_scenes_work(tmp_path, ray_session, dtype):
    ids, classes = paint_objects(260, 300, TILE, OVERLAP)
    scene = tmp_path / f"{dtype}.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=300, height=260, count=3, dtype=dtype, crs=UTM[0],
                       transform=UTM[1]) as dst:
        dst.write(np.stack([ids, classes, np.full_like(ids, 200)]).astype(dtype))
    reference = tmp_path / "reference.tif"
    write_scene(reference, ids, classes, *UTM)
    out, ref_out = tmp_path / "out.gpkg", tmp_path / "ref.gpkg"
    run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP, scaling="range",
              value_range=[0, 255], progress=False)
    run_scene(str(reference), ref_out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
              scaling="divide255", progress=False)
    assert features(out) == features(ref_out)


@pytest.mark.parametrize("mask_kind", ["alpha band", "internal mask"])
def test_transparent_pixels_of_an_orthomosaic_never_yield_objects(tmp_path, ray_session, mask_kind):
    ids, classes = paint_objects(260, 300, TILE, OVERLAP)
    opaque = np.ones(ids.shape, dtype=bool)
    opaque[:, 180:] = False  # the collar: image values are still there, but the mask says "no data"
    scene, reference = tmp_path / "ortho.tif", tmp_path / "cut.tif"
    profile = dict(driver="GTiff", width=300, height=260, dtype="uint8", crs=UTM[0], transform=UTM[1])
    rgb = np.stack([ids, classes, np.full_like(ids, 200)])
    if mask_kind == "alpha band":
        with rasterio.open(scene, "w", count=4, photometric="RGB", alpha="YES", **profile) as dst:
            dst.write(np.concatenate([rgb, 255 * opaque[None].astype(np.uint8)]))
    else:
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
            with rasterio.open(scene, "w", count=3, **profile) as dst:
                dst.write(rgb)
                dst.write_mask(opaque)
    write_scene(reference, np.where(opaque, ids, 0), np.where(opaque, classes, 0), *UTM)
    out, ref_out = tmp_path / "ortho.gpkg", tmp_path / "cut.gpkg"
    run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP, progress=False)
    run_scene(str(reference), ref_out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
              scaling="divide255", progress=False)
    assert features(out) == features(ref_out) and len(features(out)) > 0


def test_grey_plus_alpha_feeds_the_grey_band_three_times(tmp_path):
    from pipeline.raster import open_scene, resolve_bands

    scene = tmp_path / "grey_alpha.tif"
    write_raster(scene, count=2)
    with rasterio.open(scene, "r+") as dst:
        dst.colorinterp = [rasterio.enums.ColorInterp.gray, rasterio.enums.ColorInterp.alpha]
    info = open_scene(str(scene))
    assert info.alpha == 2 and info.masked
    assert resolve_bands(None, info.count, str(scene), info.alpha) == [1, 1, 1]


def test_band_count_the_config_cannot_map_is_refused(tmp_path):
    scene = tmp_path / "two_bands.tif"
    write_raster(scene, count=2)
    from core.errors import UserError

    with pytest.raises(UserError, match="two_bands.tif: has 2 colour bands.*--bands"):
        run_scene(str(scene), tmp_path / "out.gpkg", predictor=OraclePredictor(), progress=False)
    with pytest.raises(UserError, match=r"bands \[3\] do not exist"):
        run_scene(str(scene), tmp_path / "out.gpkg", predictor=OraclePredictor(), bands=[1, 2, 3], progress=False)


def test_scene_smaller_than_a_tile_works(tmp_path, ray_session):
    ids, classes = paint_objects(260, 300, TILE, OVERLAP)
    scene = tmp_path / "small.tif"
    write_scene(scene, ids[:90, :100], classes[:90, :100], *UTM)
    out = tmp_path / "small.gpkg"
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
                        scaling="divide255", progress=False)
    assert summary.tiles == 1 and summary.complete
    frame = gpd.read_file(out)
    left, bottom, right, top = rasterio.transform.array_bounds(90, 100, UTM[1])
    assert len(frame) == len(set(np.unique(ids[:90, :100])) - {0})
    assert frame.total_bounds[0] >= left and frame.total_bounds[2] <= right


def test_corrupt_block_is_reported_by_window_and_marks_the_output_incomplete(tmp_path, ray_session):
    ids, classes = paint_objects(260, 300, TILE, OVERLAP)
    scene = tmp_path / "corrupt.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=300, height=260, count=3, dtype="uint8", crs=UTM[0],
                       transform=UTM[1], tiled=True, blockxsize=64, blockysize=64, compress="deflate") as dst:
        dst.write(np.stack([ids, classes, np.full_like(ids, 200)]))
    with rasterio.open(scene) as src:  # garble one block in the middle of the scene
        offset = int(src.get_tag_item("BLOCK_OFFSET_2_2", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_2_2", "TIFF", bidx=1))
    data = bytearray(scene.read_bytes())
    data[offset:offset + size] = b"\xff" * size
    scene.write_bytes(bytes(data))
    out = tmp_path / "out.gpkg"
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
                        scaling="divide255", progress=False)
    assert not summary.complete
    failed = {tuple(f["window"]) for f in summary.failed}
    block = (128, 128, 192, 192)  # pixels of block (2, 2)
    assert failed and all(c < block[2] and c + w > block[0] and r < block[3] and r + h > block[1]
                          for c, r, w, h in failed)
    assert "INCOMPLETE" in "\n".join(summary.lines())
    assert out.exists() and state_dir(out).exists()  # partial result written, tiles kept for a retry
    import pyogrio

    assert '"complete": false' in pyogrio.read_info(out)["layer_metadata"]["aerial_seg_run"]
    # The overview cannot be read either: no quicklook, said once, and the polygons are still delivered.
    assert not (tmp_path / "out.quicklook.png").exists()
    assert any("no quicklook" in w for w in summary.warnings)
    assert '"complete": false' in (tmp_path / "out.report.json").read_text()


def test_unwritable_output_directory_is_refused_before_work(tmp_path, monkeypatch, scene):
    import pipeline.run as run_module
    from core.errors import UserError

    real_access = os.access
    monkeypatch.setattr(run_module.os, "access", lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    with pytest.raises(UserError, match="not writable"):
        run_scene(str(scene), tmp_path / "out.gpkg", predictor=OraclePredictor(), progress=False)
    with pytest.raises(UserError, match="does not exist"):
        run_scene(str(scene), tmp_path / "nowhere" / "out.gpkg", predictor=OraclePredictor(), progress=False)


def test_a_disk_full_while_saving_tiles_stops_the_run_without_an_output(tmp_path, monkeypatch, scene, ray_session):
    """Tiles are saved on the output thread: its error must stop the run, not vanish, and leave no output."""
    from pipeline.store import TileStore

    real_save, saved = TileStore.save, []

    def save(store, result):
        if len(saved) == 2:
            raise OSError(28, "No space left on device")
        saved.append(result.index)
        real_save(store, result)

    monkeypatch.setattr(TileStore, "save", save)
    out = tmp_path / "out.gpkg"
    with pytest.raises(OSError, match="No space left"):
        run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP, scaling="divide255",
                  progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.gpkg.tiles", "scene.tif"]  # no temporary file
    assert saved_tiles(state_dir(out)) == 2  # what was saved stays, for a resume


class UnloadableModel(OraclePredictor):
    def load(self):
        raise FileNotFoundError("model.pt is not on this node")


def test_a_model_the_workers_cannot_load_fails_clearly(tmp_path, scene, ray_session):
    from core.errors import UserError

    out = tmp_path / "out.gpkg"
    with pytest.raises(UserError, match="could not start the model: .*not on this node"):
        run_scene(str(scene), out, predictor=UnloadableModel(), tile=TILE, overlap=OVERLAP, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]  # no output, no saved-tiles folder


def test_a_worker_killed_for_memory_is_replaced_and_its_tiles_computed_again(tmp_path, scene, ray_session,
                                                                            monkeypatch):
    """Ray's memory monitor kills a worker: the batch it held comes back as an OutOfMemoryError. That is a lost
    worker like any other (replaced, its tiles re-submitted), with fewer batches queued from then on."""
    import ray

    from pipeline.worker import TileOutput

    reference = tmp_path / "reference.gpkg"
    run_scene(str(scene), reference, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
              scaling="divide255", progress=False)
    real_get, killed = ray.get, []

    def get(refs, *args, **kwargs):
        value = real_get(refs, *args, **kwargs)
        if not killed and isinstance(value, list) and value and isinstance(value[0], TileOutput):
            killed.append(True)
            raise ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.")
        return value

    monkeypatch.setattr(ray, "get", get)
    out = tmp_path / "out.gpkg"
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), tile=TILE, overlap=OVERLAP,
                        scaling="divide255", batch_size=1, progress=False)
    assert killed and summary.complete and summary.resubmitted_tiles >= 1 and summary.worker_restarts == 1
    assert any("memory monitor" in w and "batches queued per worker lowered to 1" in w for w in summary.warnings)
    assert features(out) == features(reference)
