"""Nothing the user gave is destroyed, nothing mixed is reported as done: outputs never resolve to inputs,
literal file names are never globbed, one run per output, saved tiles reused only under their own settings."""

from __future__ import annotations

import json

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from core.errors import UserError
from core.files import exclusive, lock_path
from pipeline.batch import run_scenes
from pipeline.run import run_scene
from pipeline.scenes import expand_scenes
from tests.oracle import OraclePredictor, paint_objects, write_scene

TILE, OVERLAP = 128, 32
UTM = ("EPSG:32616", Affine(0.5, 0, 733600.0, 0, -0.5, 3725140.0))
OPTIONS = {"tile": TILE, "overlap": OVERLAP, "scaling": "divide255", "progress": False}


class CheckpointOracle(OraclePredictor):
    """The oracle, claiming to come from a checkpoint file (as CheckpointPredictor does)."""

    def __init__(self, checkpoint: Path):
        self.checkpoint = str(checkpoint)


def raster_geopackage(path: Path) -> Path:
    ids, classes = paint_objects(200, 220, TILE, OVERLAP)
    with rasterio.open(path, "w", driver="GPKG", width=220, height=200, count=3, dtype="uint8", crs=UTM[0],
                       transform=UTM[1]) as dst:
        dst.write(np.stack([ids, classes, np.full_like(ids, 200)]))
    return path


def test_a_raster_geopackage_scene_is_never_its_own_output(tmp_path):
    scene = raster_geopackage(tmp_path / "scene.gpkg")
    before = scene.read_bytes()
    # The default output (beside the scene, SCENE.gpkg) is the scene itself, --overwrite or not.
    with pytest.raises(UserError, match="would overwrite the input .*scene.gpkg"):
        list(run_scenes([str(scene)], OraclePredictor(), None, overwrite=True, **OPTIONS))
    # -o naming it, directly, through a symbolic link or through a hard link.
    (tmp_path / "link.gpkg").symlink_to(scene)
    os.link(scene, tmp_path / "hard.gpkg")
    for output in (scene, tmp_path / "link.gpkg", tmp_path / "hard.gpkg", tmp_path / "sub" / ".." / "scene.gpkg"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(UserError, match="would overwrite the input"):
            run_scene(str(scene), output, predictor=OraclePredictor(), overwrite=True, **OPTIONS)
    assert scene.read_bytes() == before


def test_checkpoint_and_config_are_never_outputs(tmp_path):
    scene = tmp_path / "scene.tif"
    ids, classes = paint_objects(200, 220, TILE, OVERLAP)
    write_scene(scene, ids, classes, *UTM)
    checkpoint = tmp_path / "model.gpkg"  # any name: what matters is that it is read by the run
    checkpoint.write_bytes(b"weights")
    config = tmp_path / "settings.gpkg"
    config.write_text("tile: 128\n")
    with pytest.raises(UserError, match="would overwrite the input .*model.gpkg"):
        run_scene(str(scene), checkpoint, predictor=CheckpointOracle(checkpoint), overwrite=True, **OPTIONS)
    with pytest.raises(UserError, match="would overwrite the input .*settings.gpkg"):
        run_scene(str(scene), config, predictor=OraclePredictor(), config=config, overwrite=True, **OPTIONS)
    # The sidecars too: `scene.report.json` must not be the report of an output named `scene.gpkg`... of
    # another input: an input called OUT.report.json would be replaced by the report.
    report = tmp_path / "out.report.json"
    report.write_text("{}")
    with pytest.raises(UserError, match="would overwrite the input .*out.report.json"):
        run_scene(str(scene), tmp_path / "out.gpkg", predictor=OraclePredictor(), config=report, **OPTIONS)
    assert checkpoint.read_bytes() == b"weights" and config.read_text() == "tile: 128\n"


def test_prepare_never_replaces_a_directory_that_holds_its_inputs(tmp_path):
    from pipeline.training_data.prepare import prepare
    from pipeline.settings import load_settings

    data = tmp_path / "data"
    data.mkdir()
    scene = data / "scene.tif"
    ids, classes = paint_objects(200, 220, TILE, OVERLAP)
    write_scene(scene, ids, classes, *UTM)
    labels = data / "labels.geojson"
    labels.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(UserError, match="holds the input"):
        prepare([str(scene)], str(labels), data, load_settings(None), overwrite=True, progress=False)
    assert scene.exists() and labels.exists()


def test_a_file_name_with_glob_characters_is_taken_as_itself(tmp_path):
    for name in ("ortho[2023].tif", "ortho2.tif", "ortho0.tif"):
        (tmp_path / name).write_bytes(b"x")
    literal = str(tmp_path / "ortho[2023].tif")
    assert expand_scenes([literal]) == [literal]
    # A pattern that names no existing file is still a pattern.
    assert expand_scenes([str(tmp_path / "ortho[02].tif")]) == [str(tmp_path / "ortho0.tif"),
                                                                str(tmp_path / "ortho2.tif")]


def test_one_run_per_output_and_a_killed_runs_lock_is_taken_over(tmp_path, ray_session):
    scene = tmp_path / "scene.tif"
    ids, classes = paint_objects(200, 220, TILE, OVERLAP)
    write_scene(scene, ids, classes, *UTM)
    out = tmp_path / "out.gpkg"
    with exclusive(out):  # another run holds the output
        with pytest.raises(UserError, match=f"another run is writing this output \\(pid {os.getpid()} on "):
            run_scene(str(scene), out, predictor=OraclePredictor(), **OPTIONS)
    assert not out.exists() and not lock_path(out).exists()
    # A run killed with SIGKILL leaves its lock file, but the kernel dropped its lock: the next run goes on.
    lock_path(out).write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00: python -m pipeline run")
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), **OPTIONS)
    assert summary.complete and out.exists() and not lock_path(out).exists()


def test_a_saved_tile_of_other_settings_is_never_reused(tmp_path):
    from pipeline.store import FORMAT, TileStore
    from pipeline.worker import TileOutput

    directory = tmp_path / "state"
    first = TileStore(directory, "threshold 0.3")
    first.save(TileOutput(0, 3, "nodata"))
    first.close()
    # A second run with other settings took over the folder's manifest while the first still wrote tiles.
    (directory / "manifest.json").write_text(json.dumps({"fingerprint": "threshold 0.5", "format": FORMAT}))
    store = TileStore(directory, "threshold 0.5")
    assert not store.stale and list(store.saved(0)) == []  # so it is computed again
    store.save(TileOutput(0, 5, "nodata"))
    store.close()
    assert [t.index for t in TileStore(directory, "threshold 0.5").saved(0)] == [5]


def test_outputs_that_cannot_be_written_answer_in_one_line_before_any_work(tmp_path, capsys):
    from pipeline.cli import main

    scene = tmp_path / "scene.tif"
    ids, classes = paint_objects(200, 220, TILE, OVERLAP)
    write_scene(scene, ids, classes, *UTM)
    directory = tmp_path / "taken.gpkg"
    directory.mkdir()
    with pytest.raises(UserError, match="is a directory"):
        run_scene(str(scene), directory, predictor=OraclePredictor(), **OPTIONS)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder should be")
    checkpoint = tmp_path / "missing.pt"
    for args in (["run", str(scene), "--out-dir", str(blocker / "outputs")],
                 ["prepare", str(scene), "--labels", str(scene), "--out", str(blocker / "tiles")]):
        code = main([*args, "--checkpoint", str(checkpoint)] if args[0] == "run" else args)
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
    # The checkpoint is checked before the outputs; with a real model path the out-dir one answers.
    model = tmp_path / "model.pt"
    from model.builder import build_model
    from model.checkpoint import save_checkpoint
    from model.config import load_config

    config = load_config("data/samples/resnet50_cpu.yaml", {"classes": ["building"]})
    save_checkpoint(model, build_model(config, load_weights=False), config, ["building"])
    code = main(["run", str(scene), "--out-dir", str(blocker / "outputs"), "--checkpoint", str(model)])
    err = capsys.readouterr().err
    assert code == 2 and "cannot create the output directory" in err and len(err.strip().splitlines()) == 1


def test_a_rerun_removes_what_a_run_killed_while_writing_left(tmp_path, ray_session):
    scene = tmp_path / "scene.tif"
    ids, classes = paint_objects(200, 220, TILE, OVERLAP)
    write_scene(scene, ids, classes, *UTM)
    out = tmp_path / "out.gpkg"
    leftovers = [tmp_path / ".out.gpkg.k3j9x.partial.gpkg", tmp_path / ".out.quicklook.png.ab12.partial.png",
                 tmp_path / ".out.report.json.zz.partial.json"]
    for path in leftovers:
        path.write_bytes(b"\0" * 4096)
    keep = tmp_path / ".other.gpkg.k3j9x.partial.gpkg"  # another output's: not ours to remove
    keep.write_bytes(b"x")
    summary = run_scene(str(scene), out, predictor=OraclePredictor(), **OPTIONS)
    assert summary.complete and out.exists() and keep.exists()
    assert not any(path.exists() for path in leftovers)
