"""Training loop: a short run, a weights file and its training state, an exact resume after an interruption,
and evaluation."""

from __future__ import annotations

import csv
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning

import model.train as train_module
from model.checkpoint import load_checkpoint, read_checkpoint, read_train_state, train_state_path
from core.errors import UserError
from model.compare import compare
from model.config import load_config
from model.train import TrainOptions, build_session, losses_path, plan_training, train
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
    assert set(payload) == {"format_version", "config", "class_names", "model"}  # what a user hands over
    assert payload["class_names"] == ["box"]
    state_file = train_state_path(out)
    assert state_file == tmp_path / "model.train-state.pt"
    assert read_train_state(out)["iteration"] == 2
    # AdamW keeps two moments per weight: the state file is twice the weights file, which no longer carries it.
    assert 1.9 < state_file.stat().st_size / out.stat().st_size < 2.1
    rows = list(csv.DictReader(losses_path(out).open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    model, _ = load_checkpoint(out)
    assert not model.training


def test_resume_after_interrupt_matches_an_uninterrupted_run(data, tmp_path, monkeypatch):
    options = dict(data=data, iters=4, batch_size=2, seed=3, progress=False)  # 2 iterations per epoch
    straight = tmp_path / "straight.pt"
    train(small_config(), TrainOptions(out=straight, **options))

    real_save = train_module.save_training
    calls = []

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:  # interrupt right after the first epoch's checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_training", save_then_interrupt)
    resumed = tmp_path / "resumed.pt"
    with pytest.raises(KeyboardInterrupt):
        train(small_config(), TrainOptions(out=resumed, **options))
    monkeypatch.setattr(train_module, "save_training", real_save)
    assert read_train_state(resumed)["iteration"] == 2

    assert_resumes_from_a_single_file_of_earlier_versions(resumed, TrainOptions(out=resumed, **options))
    summary = train(small_config(), TrainOptions(out=resumed, resume=True, **options))
    assert summary["resumed_from"] == 2

    a, b = read_checkpoint(straight)["model"], read_checkpoint(resumed)["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), key
    rows = list(csv.DictReader(losses_path(resumed).open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4]  # nothing lost, nothing logged twice


def assert_resumes_from_a_single_file_of_earlier_versions(weights: Path, options: TrainOptions) -> None:
    """Earlier versions kept the training state inside the weights file; --resume still takes it from there."""
    state = torch.load(train_state_path(weights), weights_only=True)
    legacy = weights.with_name("legacy.pt")
    torch.save({**read_checkpoint(weights), "training_state": state}, legacy)
    options = replace(options, out=legacy, resume=True)
    plan = plan_training(small_config(), options)
    assert plan.start == state["iteration"] == 2
    session = build_session(plan, options, torch.device("cpu"))
    restored = session.optimizer.state_dict()["state"]
    assert restored.keys() == state["optimizer"]["state"].keys()
    for key, moments in state["optimizer"]["state"].items():
        assert all(torch.equal(restored[key][name], value) for name, value in moments.items()), key


def test_resume_refuses_a_different_schedule(data, tmp_path):
    out = tmp_path / "model.pt"
    train(small_config(), TrainOptions(data=data, out=out, iters=1, batch_size=2, progress=False))
    with pytest.raises(UserError, match="resume with the same"):
        train(small_config(), TrainOptions(data=data, out=out, iters=3, batch_size=2, resume=True, progress=False))


def test_resume_refuses_a_training_state_of_other_weights(data, tmp_path):
    """The two files are written one after the other: a run stopped between the two writes, or a state file
    copied from another run, leaves weights and state that do not belong together."""
    out = tmp_path / "model.pt"
    options = dict(data=data, out=out, iters=1, batch_size=2, progress=False)
    train(small_config(), TrainOptions(**options))
    earlier_state = tmp_path / "earlier.train-state.pt"
    shutil.copyfile(train_state_path(out), earlier_state)
    train(small_config(), TrainOptions(seed=1, **options))  # new weights and their state
    shutil.copyfile(earlier_state, train_state_path(out))  # as if the second run stopped after the weights
    with pytest.raises(UserError, match="model.train-state.pt: training state of other weights than .*model.pt"):
        train(small_config(), TrainOptions(seed=1, resume=True, **options))
    train_state_path(out).unlink()
    with pytest.raises(UserError, match="model.train-state.pt: not found: nothing to resume"):
        train(small_config(), TrainOptions(seed=1, resume=True, **options))


def test_validates_and_checkpoints_every_n_iterations_and_stops_when_asked(data, tmp_path, monkeypatch):
    """validate_every / checkpoint_every count iterations across epochs (4 tiles, batch 1: epochs of 4);
    stop_when ends the run one iteration later, with a checkpoint there; the history holds every row and each
    validation's training seconds."""
    real_save, saved = train_module.save_training, []

    def recording_save(path, model, config, class_names, state):
        saved.append(state["iteration"])
        real_save(path, model, config, class_names, state)

    monkeypatch.setattr(train_module, "save_training", recording_save)
    out = tmp_path / "model.pt"
    options = TrainOptions(data=data, out=out, iters=8, batch_size=1, validate=True, validate_every=2,
                           checkpoint_every=3, progress=False)
    summary = train(small_config(), options, stop_when=lambda row: "val" in row and row["iteration"] == 4)
    assert [v["iteration"] for v in summary["val"]] == [2, 4]
    assert saved == [3, 5]
    history = summary["history"]
    assert [r["iteration"] for r in history] == [1, 2, 3, 4, 5]
    assert summary["val"][1]["seconds"] == pytest.approx(sum(r["seconds"] for r in history[:4]))
    assert set(summary["val"][0]["segm"]) >= {"AP", "AP50"} and set(summary["val"][0]["bbox"]) >= {"AP", "AP50"}
    rows = list(csv.DictReader(losses_path(out).open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2, 3, 4, 5] and "val" not in rows[0]
    with pytest.raises(UserError, match="--validate-every must be at least 1"):
        train(small_config(), replace(options, validate_every=0))


def test_compare_writes_the_table_and_draws_the_curves(data, tmp_path):
    configs = []
    for name in ("swin_t", "resnet50"):
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(f"model: {{backbone: {{name: {name}}}}}\nschedule: {{warmup_iters: 1}}\n")
    out = tmp_path / "compare"
    rows = compare([str(c) for c in configs], data, out, iters=2, epochs=None, batch_size=2, device="cpu", seed=0,
                   validate_every=1)
    assert [r["backbone"] for r in rows] == ["swin_t", "resnet50"]
    assert all([v["iteration"] for v in r["validations"]] == [1, 2] for r in rows)
    assert "![" in (out / "compare.md").read_text() and "(compare.png)" in (out / "compare.md").read_text()
    png = out / "compare.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(png) as src:
            page = src.read()[:3].transpose(1, 2, 0).astype(int)
    assert page.shape[:2] == (800, 1200)
    for colour in ((31, 119, 180), (255, 127, 14)):  # matplotlib's C0 and C1: one line colour per backbone
        assert (np.abs(page - colour).sum(axis=2) < 30).sum() > 200, colour
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.parametrize("backbone", ["swin_t", "resnet50"])
def test_a_few_iterations_on_one_tile_drive_the_loss_down(backbone, tmp_path):
    """The training chain learns: 8 steps on one tile (the CPU config, random weights) lower the losses that
    depend on the targets being right: the RPN's objectness and box regression (anchors matched to the boxes)
    and the mask loss (mask targets cut from the right place). The RoI classifier's loss is left out: it falls
    at once, then rises again as the RPN starts to propose objects the head must tell apart; the benchmark
    tests/benchmarks/bench_overfit.py checks the end of the story (AP on memorised tiles)."""
    write_coco_tiles(tmp_path / "data" / "train", n_images=1)
    config = load_config(f"data/samples/{backbone}_cpu.yaml", {"schedule": {"warmup_iters": 1}})
    summary = train(config, TrainOptions(data=tmp_path / "data", out=tmp_path / "model.pt", iters=8, batch_size=1,
                                         checkpoint_every=8, progress=False))
    history = summary["history"]

    def mean(key: str, rows: list[dict]) -> float:
        return sum(r[key] for r in rows) / len(rows)

    learned = ("loss_objectness", "loss_rpn_box_reg", "loss_mask")
    assert mean("loss_mask", history[:1]) == pytest.approx(0.69, abs=0.03)  # the mask head starts at "don't know"
    for key in learned:
        assert mean(key, history[-2:]) < 0.92 * mean(key, history[:2]), key
    first, last = (sum(mean(k, rows) for k in learned) for rows in (history[:2], history[-2:]))
    assert last < 0.8 * first
