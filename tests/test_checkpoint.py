"""Checkpoint files: damage is refused on load, by every reader, and the files written before the training state
moved out of the weights file still load."""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine

from model.builder import build_model
from model.checkpoint import load_checkpoint, read_checkpoint, read_checkpoint_header, save_checkpoint
from model.config import load_config
from core.errors import UserError
from pipeline.cli import main
from tests.coco_fixtures import write_coco_tiles

CLASSES = ["building", "tree"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = load_config(overrides={"classes": CLASSES})
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_checkpoint(path, build_model(config), config, CLASSES)
    return path


def flip_bytes_in_largest_tensor(path: Path, count: int = 4096) -> str:
    """Invert `count` bytes in the middle of the checkpoint's largest tensor record (a stored zip member), the
    damage a bad disk or a broken copy does: the zip stays readable and so do the weights, wrongly."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with path.open("r+b") as f:
        f.seek(info.header_offset)
        name_length, extra_length = struct.unpack("<HH", f.read(30)[26:30])
        start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))
    return info.filename


def corrupted_copy(checkpoint: Path, tmp_path: Path) -> Path:
    bad = tmp_path / "damaged.pt"
    shutil.copyfile(checkpoint, bad)
    flip_bytes_in_largest_tensor(bad)
    return bad


def test_flipped_bytes_in_a_tensor_are_refused_by_every_reader(checkpoint, tmp_path):
    bad = corrupted_copy(checkpoint, tmp_path)
    for read in (read_checkpoint, read_checkpoint_header, load_checkpoint):
        with pytest.raises(UserError) as caught:
            read(bad)
        message = str(caught.value)
        assert message.startswith(f"{bad}: damaged checkpoint") and "CRC32" in message and "\n" not in message
    read_checkpoint_header(checkpoint)  # the intact original still reads


def test_run_refuses_a_damaged_checkpoint_before_ray_starts(checkpoint, tmp_path, capsys, monkeypatch):
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:32616",
                       transform=Affine(0.5, 0, 500000, 0, -0.5, 3700000)) as dst:
        dst.write(np.zeros((3, 64, 64), dtype=np.uint8))
    ray_started = []
    monkeypatch.setattr("pipeline.pool.connect_ray", lambda *args, **kwargs: ray_started.append(1))
    bad = corrupted_copy(checkpoint, tmp_path)
    out = tmp_path / "out.gpkg"
    code = main(["run", str(scene), "--checkpoint", str(bad), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {bad}: damaged checkpoint") and "\n" not in err
    assert not ray_started and not out.exists()


def test_evaluate_refuses_a_damaged_checkpoint(checkpoint, tmp_path, capsys):
    data = write_coco_tiles(tmp_path / "val", n_images=1)
    bad = corrupted_copy(checkpoint, tmp_path)
    code = main(["evaluate", str(bad), "--data", str(data)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {bad}: damaged checkpoint") and "\n" not in err
    assert not bad.with_suffix(".eval.json").exists()


def test_a_single_file_checkpoint_with_its_training_state_still_loads(checkpoint, tmp_path):
    """Before the training state moved to its own file, `train` wrote it inside the weights file."""
    payload = read_checkpoint(checkpoint)
    model = load_checkpoint(checkpoint)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():
        param.grad = torch.full_like(param, 0.01)
    optimizer.step()  # moves every weight and fills the optimizer's state with a tensor per parameter
    old = tmp_path / "old.pt"
    torch.save({**payload, "model": model.state_dict(),
                "training_state": {"iteration": 1, "total_iters": 2, "seed": 0, "batch_size": 1, "workers": 1,
                                   "global_batch": 1, "optimizer": optimizer.state_dict(), "scheduler": {}}}, old)
    header = read_checkpoint_header(old)
    assert header["class_names"] == CLASSES and header["format_version"] == 1
    loaded, _ = load_checkpoint(old)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
