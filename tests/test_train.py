"""Training loop: a short run, a checkpoint, an exact resume after an interruption, and evaluation."""

from __future__ import annotations

import csv

import pytest
import torch

import model.train as train_module
from model.checkpoint import load_checkpoint, read_checkpoint
from model.config import load_config
from model.train import TrainOptions, losses_path, train
from tests.coco_fixtures import write_coco_tiles


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco_tiles(root / "train", n_images=4)
    write_coco_tiles(root / "val", n_images=2, seed=1)
    return root


def small_config():
    return load_config("configs/swin_t.yaml", {"schedule": {"warmup_iters": 1}})


def test_train_writes_checkpoint_and_loss_log(data, tmp_path):
    out = tmp_path / "model.pt"
    summary = train(small_config(), TrainOptions(data=data, out=out, iters=2, batch_size=2, progress=False))
    assert summary["iterations"] == 2 and summary["first_loss"] > 0
    payload = read_checkpoint(out)
    assert payload["class_names"] == ["box"] and payload["training_state"]["iteration"] == 2
    rows = list(csv.DictReader(losses_path(out).open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    model, _ = load_checkpoint(out)
    assert not model.training


def test_resume_after_interrupt_matches_an_uninterrupted_run(data, tmp_path, monkeypatch):
    options = dict(data=data, iters=4, batch_size=2, seed=3, progress=False)  # 2 iterations per epoch
    straight = tmp_path / "straight.pt"
    train(small_config(), TrainOptions(out=straight, **options))

    real_save = train_module.save_checkpoint
    calls = []

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # interrupt right after the first epoch's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_interrupt)
    resumed = tmp_path / "resumed.pt"
    with pytest.raises(KeyboardInterrupt):
        train(small_config(), TrainOptions(out=resumed, **options))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert read_checkpoint(resumed)["training_state"]["iteration"] == 2
    summary = train(small_config(), TrainOptions(out=resumed, resume=True, **options))
    assert summary["resumed_from"] == 2

    a, b = read_checkpoint(straight)["model"], read_checkpoint(resumed)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    rows = list(csv.DictReader(losses_path(resumed).open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]  # nothing lost, nothing logged twice


def test_resume_refuses_a_different_schedule(data, tmp_path):
    out = tmp_path / "model.pt"
    train(small_config(), TrainOptions(data=data, out=out, iters=1, batch_size=2, progress=False))
    from model.errors import UserError

    with pytest.raises(UserError, match="resume with the same"):
        train(small_config(), TrainOptions(data=data, out=out, iters=3, batch_size=2, resume=True, progress=False))
