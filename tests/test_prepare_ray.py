"""prepare over several scenes as Ray tasks: the same output as one process, resumable, any scene argument."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from affine import Affine
from shapely.geometry import box

import pipeline.training_data.prepare as prepare_module
from core.errors import UserError
from pipeline.cli import main
from pipeline.training_data.prepare import prepare, staging_dir
from pipeline.settings import load_settings
from pipeline.windows import plan_windows
from tests.test_prepare import TRANSFORM, UTM

# (name, width, height, CRS, affine): different sizes, one scene in WGS84 while the labels are in UTM.
SCENES = [
    ("a", 200, 160, UTM, TRANSFORM),
    ("b", 256, 130, UTM, TRANSFORM * Affine.translation(150, 100)),
    ("c", 150, 120, "EPSG:4326", Affine(5e-6, 0, -84.4811, 0, -5e-6, 33.6402)),
]


@pytest.fixture(autouse=True)
def small_parts(monkeypatch):
    """Several parts per scene even for tiny scenes (parts are planned in the driver)."""
    monkeypatch.setattr(prepare_module, "PART_WINDOWS", 5)


def write_scene(path: Path, width: int, height: int, crs: str, transform: Affine, seed: int) -> None:
    """Random RGB (so every PNG differs), tiled and compressed like a real orthophoto."""
    data = np.random.default_rng(seed).integers(1, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs,
                       transform=transform, nodata=0, tiled=True, blockxsize=32, blockysize=32,
                       compress="deflate") as dst:
        dst.write(data)


def corrupt_block(path: Path) -> None:
    """Overwrite one compressed block of the first band: the scene opens, reading that block fails."""
    with rasterio.open(path) as src:
        offset = int(src.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", bidx=1))
        size = int(src.get_tag_item("BLOCK_SIZE_1_1", "TIFF", bidx=1))
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


def write_labels(path: Path) -> None:
    """Squares of two classes in UTM, over all three scenes."""
    rng = np.random.default_rng(7)
    x0, y0 = TRANSFORM.c, TRANSFORM.f
    polys = []
    for _ in range(40):  # over part of the scenes, so some tiles are label-free
        x, y, size = rng.uniform(0, 130), rng.uniform(0, 70), rng.uniform(2, 12)
        polys.append(box(x0 + x, y0 - y - size, x0 + x + size, y0 - y))
    kinds = rng.choice(["car", "house"], len(polys))
    gpd.GeoDataFrame({"kind": kinds}, geometry=polys, crs=UTM).to_file(path)


@pytest.fixture
def job(tmp_path) -> tuple[list[str], str]:
    scenes = []
    for seed, (name, width, height, crs, transform) in enumerate(SCENES):
        write_scene(tmp_path / f"{name}.tif", width, height, crs, transform, seed)
        scenes.append(str(tmp_path / f"{name}.tif"))
    write_labels(tmp_path / "labels.gpkg")
    return scenes, str(tmp_path / "labels.gpkg")


def job_settings(workers: int | None = None, **options):
    return load_settings(overrides={"tile": 64, "overlap": 16, **options, "prepare": {
        "class_field": "kind", "min_area_px": 4, "empty_fraction": 0.5, "val_fraction": 0.3, "workers": workers}})


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_ray_output_equals_one_process(tmp_path, job, ray_session):
    scenes, labels = job
    one = prepare(scenes, labels, tmp_path / "one", job_settings(workers=1), progress=False)
    two = prepare(scenes, labels, tmp_path / "two", job_settings(workers=2), progress=False)
    assert one == two
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")  # PNG bytes, annotations, summary.json
    coco = {split: json.loads((tmp_path / "two" / split / "annotations.json").read_text())
            for split in ("train", "val")}
    # Every scene contributes tiles and objects, including the WGS84 one; ids follow scene then window order.
    assert {Path(im["scene"]).stem for split in coco.values() for im in split["images"]} == {"a", "b", "c"}
    assert all(split["annotations"] for split in coco.values())
    for split in coco.values():
        order = [(Path(im["scene"]).stem, im["window"][1], im["window"][0]) for im in split["images"]]
        assert order == sorted(order) and [im["id"] for im in split["images"]] == list(range(1, len(order) + 1))
    assert one["dropped_empty_tiles"] > 0 and one["tiles"]["val"] > 0


def test_rerun_after_a_failed_task_cuts_only_what_is_missing(tmp_path, job, ray_session, capsys):
    scenes, labels = job
    broken = Path(scenes[2])
    corrupt_block(broken)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"c\.tif: cannot read the window at column \d+, row \d+ .*IReadBlock failed"):
        prepare(scenes, labels, out, job_settings(workers=2), progress=False)
    assert not out.exists()
    staging = staging_dir(out)
    saved = Counter(Path(json.loads(p.read_text())["scene"]).stem for p in (staging / "parts").glob("*.json"))
    for name, width, height, *_ in SCENES[:2]:  # every part of a and b finished before the failure was raised
        assert saved[name] == -(-len(plan_windows(width, height, 64, 16)) // prepare_module.PART_WINDOWS)
    before = {p.name: p.stat().st_mtime_ns for p in staging.rglob("*.png") if not p.name.startswith("c_")}
    assert before

    write_scene(broken, *SCENES[2][1:], seed=2)  # repaired: c is cut again (its fingerprint changed)
    capsys.readouterr()
    prepare(scenes, labels, out, job_settings(workers=2), progress=False)
    assert "resuming:" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert all(after[name] == mtime for name, mtime in before.items())  # a and b were not cut again
    assert any(name.startswith("c_") for name in after) and not staging.exists()
    prepare(scenes, labels, tmp_path / "fresh", job_settings(workers=1), progress=False)
    assert snapshot(out) == snapshot(tmp_path / "fresh")


def test_parts_saved_under_other_settings_are_not_reused(tmp_path, job, monkeypatch):
    """Interrupted with settings A, then with B (same tile names, other pixels), then completed with A: the
    parts A saved first were overwritten by B's tiles, so they must be cut again, not reused."""
    scenes, labels = job
    real_write = prepare_module.write_png

    def interrupted_run(s):
        written = []

        def write_then_interrupt(path, image):
            real_write(path, image)
            written.append(path)
            if len(written) == 12:
                raise KeyboardInterrupt

        monkeypatch.setattr(prepare_module, "write_png", write_then_interrupt)
        with pytest.raises(KeyboardInterrupt, match="run the same command to resume"):
            prepare(scenes, labels, tmp_path / "out", s, progress=False)
        monkeypatch.setattr(prepare_module, "write_png", real_write)

    interrupted_run(job_settings(workers=1))
    interrupted_run(job_settings(workers=1, bands=[3, 2, 1]))
    prepare(scenes, labels, tmp_path / "out", job_settings(workers=1), progress=False)
    prepare(scenes, labels, tmp_path / "fresh", job_settings(workers=1), progress=False)
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "fresh")


def test_globs_and_manifests_name_the_scenes(tmp_path, job, ray_session, capsys, monkeypatch):
    scenes, labels = job
    common = ["--labels", labels, "--class-field", "kind", "--tile", "64", "--overlap", "16", "--val-fraction",
              "0.3", "--min-area", "4"]
    assert main(["prepare", *scenes, "--out", str(tmp_path / "listed"), *common]) == 0
    # Relative paths from another directory than the Ray workers': tasks get absolute ones, records keep them.
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "*.tif", "--out", "globbed", "--workers", "2", *common]) == 0
    records = json.loads((tmp_path / "globbed" / "train" / "annotations.json").read_text())["images"]
    assert {im["scene"] for im in records} == {"a.tif", "b.tif", "c.tif"}
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "scenes.txt").write_text("# the job\n../a.tif\n\n../b.tif  # UTM\n" + scenes[2] + "\n")
    assert main(["prepare", str(tmp_path / "lists" / "scenes.txt"), "--out", str(tmp_path / "manifest"),
                 *common]) == 0
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("listed", "globbed", "manifest")]
    assert [Path(s).name for s in summaries[2]["scenes"]] == ["a.tif", "b.tif", "c.tif"]
    assert summaries[0]["tiles"] == summaries[1]["tiles"] == summaries[2]["tiles"]
    assert sorted(snapshot(tmp_path / "listed")) == sorted(snapshot(tmp_path / "globbed"))
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "*.tiff"), "--out", str(tmp_path / "none"), *common]) == 2
    assert "no file matches" in capsys.readouterr().err


def test_ray_only_when_asked(monkeypatch):
    from pipeline.settings import PrepareSettings

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    use_ray = prepare_module.use_ray
    assert not use_ray(PrepareSettings()) and not use_ray(PrepareSettings(workers=1))
    assert use_ray(PrepareSettings(workers=2)) and use_ray(PrepareSettings(ray_address="auto"))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a `ray job submit` entrypoint
    assert use_ray(PrepareSettings())
