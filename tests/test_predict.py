"""The checkpoint predictor: what a run keeps is exactly what the model gives, only cheaper."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import rasterio
import torch
from affine import Affine
from torchvision.ops import box_iou

from model.builder import build_model
from model.checkpoint import load_checkpoint, read_checkpoint, read_checkpoint_header, save_checkpoint
from model.config import load_config
from core.errors import UserError
import numpy as np

from pipeline.instances import from_output
from pipeline.predict import CheckpointPredictor, detect
from pipeline.rect import Rect
from pipeline.run import run_scene


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = load_config(overrides={"classes": ["building", "tree"]})
    path = tmp_path_factory.mktemp("model") / "random.pt"
    save_checkpoint(path, build_model(config), config, ["building", "tree"])
    return path


def count_mask_rois(predictor: CheckpointPredictor) -> list[int]:
    """Record how many detections reach the mask head per call."""
    seen: list[int] = []
    head = predictor.load().roi_heads.mask_head
    head.register_forward_hook(lambda _module, args, _out: seen.append(int(args[0].shape[0])))
    return seen


def instances(output: dict, threshold: float) -> list[tuple]:
    """What the pipeline makes of a tile's output in either form (a 128 x 160 tile at the scene's origin)."""
    window = Rect(0, 0, 160, 128)
    found = from_output(output, window, 0, np.ones((128, 160), dtype=bool), 0.5, threshold)
    return [(i.row, i.col, i.mask.tobytes(), i.mask.shape, i.label, round(i.score, 6)) for i in found]


def test_the_compact_path_gives_what_torchvisions_format_gives_on_the_same_detections(checkpoint):
    """Masks pasted into their own boxes and thresholded where the model runs are, pixel for pixel, the
    full-tile masks of torchvision's format thresholded on the host."""
    torch.manual_seed(3)
    model, _ = load_checkpoint(checkpoint)
    images = [torch.rand(3, 128, 160), torch.rand(3, 128, 160)]
    with torch.inference_mode():
        dense = model(images)
        compact = detect(model, images, score_threshold=0.05, mask_threshold=0.5)
    assert sum(len(out["scores"]) for out in dense) > 20
    for ref, out in zip(dense, compact):
        assert "masks" not in out and len(out["mask_crops"]) == len(ref["scores"])
        torch.testing.assert_close(out["boxes"], ref["boxes"])
        assert instances(ref, 0.05) == instances(out, 0.05)


def test_masks_are_computed_only_for_kept_detections(checkpoint):
    torch.manual_seed(1)
    images = [torch.rand(3, 128, 128), torch.rand(3, 128, 160)]
    full = CheckpointPredictor(str(checkpoint))
    full_rois = count_mask_rois(full)
    reference = full(images)
    scores = torch.cat([out["scores"] for out in reference]).sort().values
    threshold = float(scores[len(scores) // 2])  # a real score: the >= boundary itself is exercised
    assert scores.numel() > 10

    cut = CheckpointPredictor(str(checkpoint), score_threshold=threshold)
    cut_rois = count_mask_rois(cut)
    outputs = cut(images)

    assert cut_rois[0] < full_rois[0]
    for ref, out in zip(reference, outputs):
        keep = ref["scores"] >= threshold
        assert keep.any() and int(keep.sum()) == len(out["scores"])
        assert torch.equal(out["labels"], ref["labels"][keep])
        for key in ("boxes", "scores", "mask_boxes"):
            torch.testing.assert_close(out[key], ref[key][keep], atol=1e-5, rtol=1e-5)
        kept = [crop for crop, k in zip(ref["mask_crops"], keep.tolist()) if k]
        assert all(np.array_equal(a, b) for a, b in zip(out["mask_crops"], kept))
        # The scores under the threshold are reported, not lost: what a run that keeps nothing tells the user.
        dropped = torch.cat([ref["scores"][~keep], ref["dropped_scores"]]).sort().values
        torch.testing.assert_close(out["dropped_scores"].sort().values, dropped)


def test_the_cpu_predictor_gives_the_models_own_outputs(checkpoint):
    """The predictor runs the model in channels_last on the CPU (faster); detections must not change beyond
    float rounding: the same boxes, scores within 1e-4."""
    torch.manual_seed(2)
    images = [torch.rand(3, 128, 160)]
    predictor = CheckpointPredictor(str(checkpoint))
    model, _ = load_checkpoint(checkpoint)
    conv = next(m for m in predictor.load().modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref, out = model(images)[0], predictor(images)[0]
    assert len(ref["boxes"]) > 10
    best, index = box_iou(ref["boxes"], out["boxes"]).max(dim=1)
    assert (best > 0.999).float().mean() >= 0.9  # a near-tie at the top-100 cut may swap one or two
    matched = best > 0.999
    assert torch.allclose(ref["scores"][matched], out["scores"][index[matched]], atol=1e-4)
    differing = total = 0
    for k, j in zip(torch.nonzero(matched).flatten().tolist(), index[matched].tolist()):
        x0, y0, x1, y1 = out["mask_boxes"][j].tolist()
        dense = (ref["masks"][k, 0] >= 0.5).numpy()
        crop = np.zeros_like(dense)
        crop[y0:y1, x0:x1] = out["mask_crops"][j]
        differing, total = differing + int((dense != crop).sum()), total + dense.size
    assert differing / total < 1e-3


def test_a_predictor_stricter_than_the_run_is_refused(tmp_path, checkpoint):
    predictor = CheckpointPredictor(str(checkpoint), score_threshold=0.7)
    with pytest.raises(UserError, match="skips detections under 0.7 .* keeps those from 0.5"):
        run_scene(str(tmp_path / "missing.tif"), tmp_path / "out.gpkg", predictor, score_threshold=0.5)


def test_header_reads_what_torch_reads_and_refuses_code(tmp_path, checkpoint):
    header, full = read_checkpoint_header(checkpoint), read_checkpoint(checkpoint)
    assert header == {key: full[key] for key in ("format_version", "config", "class_names")}

    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:  # a torch-style archive whose pickle names a builtin
        archive.writestr("evil/data.pkl", pickle.dumps({"format_version": 1, "hook": print}))
    with pytest.raises(UserError, match="would run code when loaded; refused"):
        read_checkpoint_header(evil)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(checkpoint).read_bytes()[:300])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        read_checkpoint_header(truncated)
    with pytest.raises(UserError, match="checkpoint not found"):
        read_checkpoint_header(tmp_path / "missing.pt")


def test_the_run_driver_never_imports_torch(tmp_path, checkpoint):
    """torch and torchvision cost ~600 MB per process; only the Ray workers that run the model load them."""
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=96, height=80, count=3, dtype="uint8",
                       crs="EPSG:32616", transform=Affine(0.5, 0, 500000, 0, -0.5, 4000000)) as dst:
        dst.write(torch.randint(0, 255, (3, 80, 96), dtype=torch.uint8).numpy())
    script = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"code = main(['run', {str(scene)!r}, '--checkpoint', {str(checkpoint)!r}, '-o', {str(tmp_path / 'out.gpkg')!r},"
        " '--tile', '64', '--overlap', '16', '--workers', '1', '--threads-per-worker', '1'])\n"
        "print('EXIT', code, 'TORCH', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert "EXIT 0 TORCH []" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
